/* The hot line loops in C (issue 11), each a faster twin of a Python loop that stays the contract
 * (evtool/native.py says whether this module is there; the tests run both):
 *
 * - sum_lines: the processor's per-line loop for the plain shape, parser._sum_plain's work for a
 *   line without the interpreter's cost per line (below);
 * - id_lines: the sender's block of plain lines, sender._id_lines;
 * - plain_body: the receiver's check of a whole body, intake.Intake._bulk (at the end).
 *
 * sum_lines(data, pos, offset, index, fresh, sources, opaque) sums the lines of `data` from byte
 * `pos` into a ParsedPart's `fresh_table`, `sources` and `opaque`, as parser._sum_plain would,
 * and stops at the first line it does not take, before touching anything for it: it returns
 * (pos, index) of that line (len(data) when it took them all). The caller hands that line to the
 * Python loops, whose rules are the contract; this loop takes only lines it can decide with
 * certainty:
 *
 * - one flat JSON object on the line, `}` right before the newline, members separated by
 *   spaces or tabs only;
 * - members userId, name, value (required) and eventId, timestamp (optional), each once, no
 *   other; every string printable ASCII without escapes (so its text is its value);
 * - userId of 1 to 256 characters, name add_revenue or subtract_revenue, value a JSON integer
 *   of at most 18 digits (far below events.MAX_INT);
 * - timestamp a text eventtime.STAMP_MINUTE knows or eventtime.stamp_minute accepts;
 * - eventId absent, a sender id (identity.SOURCE_ID), a receiver id, or any other of at most
 *   events.MAX_EVENT_ID characters (an opaque id: given a list, its event goes there as a tuple
 *   with digests from identity's functions; given a Table and a bytearray, as a worker does,
 *   its digests are computed here and its store.DIGEST_ROW appended, its sums to the table).
 *
 * Anything else (a decimal or string value, escapes, other members, a bad stamp...) stops it.
 * The sender cells follow parser._SenderCells.add step for step. The sums go to a Table (below),
 * the part's `fresh_table` or the source part's `table`, not to the dicts of the Python loops:
 * the part renders both (parser.rows), and PostgreSQL sums a key's rows.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* memmem */
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define MAX_USER_ID 256
#define MAX_EVENT_ID 128
#define CELL_LINES 1024
#define ENTRY 10
#define MAX_DIGITS 18

/* Set once by configure(): the Python side of the contract. */
static PyObject *SourcePart, *stamp_minutes, *stamp_minute, *event_digest, *content_digest;
static PyObject *ZERO, *EMPTY, *s_cells, *s_in_order, *s_table;

typedef struct {
    const char *p;
    Py_ssize_t n;
} span;

enum { K_USER = 1, K_NAME = 2, K_VALUE = 4, K_EID = 8, K_TS = 16 };

typedef struct {
    span user, name, eid, ts;
    long long value;
    int has;
} line_t;

static inline const char *skip_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t'))
        p++;
    return p;
}

/* A string of printable ASCII without escapes, p at its opening quote: the byte after the
 * closing quote, or NULL. (An escaped quote ends the search early, but its backslash fails it.) */
static inline const char *string_at(const char *p, const char *e, span *out)
{
    if (p >= e || *p != '"')
        return NULL;
    const char *s = p + 1, *q = memchr(s, '"', e - s);
    if (q == NULL)
        return NULL;
    unsigned bad = 0;
    for (const unsigned char *c = (const unsigned char *)s; c < (const unsigned char *)q; c++)
        bad |= (*c < 0x20) | (*c > 0x7e) | (*c == '\\');
    if (bad)
        return NULL;
    out->p = s;
    out->n = q - s;
    return q + 1;
}

static inline int is_digit(char c) { return c >= '0' && c <= '9'; }

static int span_is(span s, const char *lit)
{
    size_t n = strlen(lit);
    return (size_t)s.n == n && memcmp(s.p, lit, n) == 0;
}

/* The line [p, nl) (nl at its newline) read into L; 0 when this loop does not take it (or it has
 * a member outside `allowed`, K_* bits). */
static int read_line(const char *p, const char *nl, line_t *L, int allowed)
{
    L->has = 0;
    p = skip_ws(p, nl);
    if (p >= nl || *p != '{' || nl[-1] != '}')
        return 0;
    p = skip_ws(p + 1, nl);
    for (;;) {
        span k;
        int bit;
        p = string_at(p, nl, &k);
        if (p == NULL)
            return 0;
        p = skip_ws(p, nl);
        if (p >= nl || *p != ':')
            return 0;
        p = skip_ws(p + 1, nl);
        switch (k.n) { /* the member's name, by its length first */
        case 6: bit = memcmp(k.p, "userId", 6) == 0 ? K_USER : 0; break;
        case 4: bit = memcmp(k.p, "name", 4) == 0 ? K_NAME : 0; break;
        case 5: bit = memcmp(k.p, "value", 5) == 0 ? K_VALUE : 0; break;
        case 7: bit = memcmp(k.p, "eventId", 7) == 0 ? K_EID : 0; break;
        case 9: bit = memcmp(k.p, "timestamp", 9) == 0 ? K_TS : 0; break;
        default: bit = 0;
        }
        if (!(bit & allowed))
            return 0;
        if (L->has & bit)
            return 0; /* a member twice: the Python loops decide */
        L->has |= bit;
        if (bit == K_VALUE) {
            /* a JSON integer: no sign, no leading zero, at most MAX_DIGITS digits, no fraction */
            const char *d = p;
            long long v = 0;
            if (p >= nl || !is_digit(*p))
                return 0;
            if (*p == '0' && p + 1 < nl && is_digit(p[1]))
                return 0;
            while (p < nl && is_digit(*p)) {
                if (p - d == MAX_DIGITS)
                    return 0;
                v = v * 10 + (*p - '0');
                p++;
            }
            if (p < nl && (*p == '.' || *p == 'e' || *p == 'E'))
                return 0;
            L->value = v;
        } else {
            span v;
            p = string_at(p, nl, &v);
            if (p == NULL)
                return 0;
            if (bit == K_USER)
                L->user = v;
            else if (bit == K_NAME)
                L->name = v;
            else if (bit == K_EID)
                L->eid = v;
            else
                L->ts = v;
        }
        p = skip_ws(p, nl);
        if (p >= nl)
            return 0;
        if (*p == ',') {
            p = skip_ws(p + 1, nl);
            continue;
        }
        if (*p == '}' && p + 1 == nl)
            break;
        return 0;
    }
    if ((L->has & (K_USER | K_NAME | K_VALUE)) != (K_USER | K_NAME | K_VALUE))
        return 0;
    if (L->user.n < 1 || L->user.n > MAX_USER_ID)
        return 0;
    if (!span_is(L->name, "add_revenue") && !span_is(L->name, "subtract_revenue"))
        return 0;
    return 1;
}

/* Lowercase hex digits' values; 0xff for any other byte (identity.SOURCE_ID takes [0-9a-f]). */
static unsigned char HEX[256];

static void init_hex(void)
{
    memset(HEX, 0xff, sizeof HEX);
    for (int c = 0; c < 10; c++)
        HEX['0' + c] = (unsigned char)c;
    for (int c = 0; c < 6; c++)
        HEX['a' + c] = (unsigned char)(10 + c);
}

/* identity.SOURCE_ID.fullmatch: ([0-9a-f]{16}):([1-9][0-9]{0,17})(?::([0-9a-f]{16}))?
 * On a match, the line number and the chain's 8 bytes (zeros for an old id without one). */
static int sender_id(span e, long long *number, unsigned char chain[8])
{
    const unsigned char *u = (const unsigned char *)e.p;
    Py_ssize_t i;
    long long v = 0;
    unsigned bad = 0;
    if (e.n < 18)
        return 0;
    for (i = 0; i < 16; i++)
        bad |= HEX[u[i]];
    if ((bad & 0xf0) || u[16] != ':' || u[17] < '1' || u[17] > '9')
        return 0;
    for (i = 17; i < e.n && is_digit(u[i]); i++) {
        if (i - 17 == MAX_DIGITS)
            return 0;
        v = v * 10 + (u[i] - '0');
    }
    *number = v;
    if (i == e.n) {
        memset(chain, 0, 8);
        return 1;
    }
    if (u[i] != ':' || e.n - i - 1 != 16)
        return 0;
    u += i + 1;
    for (int j = 0; j < 8; j++) {
        unsigned hi = HEX[u[2 * j]], lo = HEX[u[2 * j + 1]];
        bad |= hi | lo;
        chain[j] = (unsigned char)(hi << 4 | lo);
    }
    return (bad & 0xf0) == 0;
}

/* -- sums held in C: parser.Sums for the lines this loop takes ------------------------------------
 *
 * A Table holds a summing group's sums per (user, minute) in flat arrays: 32 bytes a key, ~8
 * of index and the user's bytes, where a dict of (str, str) -> [int, int, int, int] costs ~800. A worker part can then hold several times the users in the same memory (parser.held),
 * so batches of a journal with many distinct users are larger and upsert each user less often.
 * The Python side reads it whole: rows() (the COPY rows store.copy_rows would write), users()
 * (hash() of each distinct user), count, nbytes, and to_dict() for the tests. */

typedef struct {
    uint32_t user;      /* offset of the user's bytes in the arena */
    uint32_t key;       /* minute << 8 | (length - 1): the index in the table's minutes, 1 to 256 bytes */
    uint32_t count[2];  /* adds, subtracts */
    uint64_t amount[2]; /* added, subtracted: integers below 10**18 each */
} entry_t;               /* 32 bytes */

#define MAX_MINUTES (1u << 24)
#define E_LEN(e) ((Py_ssize_t)((e)->key & 0xff) + 1)
#define E_MINUTE(e) ((e)->key >> 8)

typedef struct {
    PyObject_HEAD
    entry_t *entries;
    Py_ssize_t used, cap;
    uint32_t *slots; /* entry index + 1, or 0: empty; at most 7/10 full */
    size_t mask;     /* slots - 1 (a power of two less one), or 0 before the first key */
    char *arena;
    size_t arena_used, arena_cap;
    PyObject *minutes;    /* list of str, by index */
    PyObject *minute_ids; /* dict str -> index */
    PyObject *last;       /* the minute object looked up last (borrowed: `minutes` holds it) */
    uint32_t last_id;
    /* sums moved out of an entry before an add would overflow its 32-bit count or 64-bit
     * amount: (user, minute) -> [adds, added, subtracts, subtracted], exact Python ints */
    PyObject *extra;
    long long events;
} Table;

static PyTypeObject TableType;

static PyObject *table_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Table() takes no arguments");
        return NULL;
    }
    Table *T = (Table *)type->tp_alloc(type, 0);
    if (T == NULL)
        return NULL;
    T->minutes = PyList_New(0);
    T->minute_ids = PyDict_New();
    T->extra = PyDict_New();
    if (!T->minutes || !T->minute_ids || !T->extra) {
        Py_DECREF(T);
        return NULL;
    }
    return (PyObject *)T;
}

static void table_dealloc(Table *T)
{
    PyMem_Free(T->entries);
    PyMem_Free(T->slots);
    PyMem_Free(T->arena);
    Py_XDECREF(T->minutes);
    Py_XDECREF(T->minute_ids);
    Py_XDECREF(T->extra);
    Py_TYPE(T)->tp_free((PyObject *)T);
}

static inline uint64_t key_hash(const char *user, Py_ssize_t n, uint32_t minute)
{
    uint64_t h = 1469598103934665603ULL ^ ((uint64_t)minute * 0x9E3779B97F4A7C15ULL);
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)user[i]) * 1099511628211ULL;
    return h ^ (h >> 31);
}

/* The index of a minute (a str) in T->minutes, added when new; -1 on an error. */
static long long table_minute(Table *T, PyObject *minute)
{
    if (minute == T->last)
        return T->last_id;
    PyObject *id = PyDict_GetItemWithError(T->minute_ids, minute);
    long long i;
    if (id != NULL) {
        i = PyLong_AsLongLong(id);
    } else {
        if (PyErr_Occurred())
            return -1;
        i = PyList_GET_SIZE(T->minutes);
        if (i >= MAX_MINUTES) {
            PyErr_SetString(PyExc_OverflowError, "a sums table holds at most 2**24 minutes");
            return -1;
        }
        PyObject *v = PyLong_FromLongLong(i);
        int r = v == NULL ? -1 : PyDict_SetItem(T->minute_ids, minute, v);
        Py_XDECREF(v);
        if (r < 0 || PyList_Append(T->minutes, minute) < 0)
            return -1;
    }
    if (i < 0)
        return -1;
    /* the list's object, alive as long as the table: a freed str's address never matches */
    T->last = PyList_GET_ITEM(T->minutes, i);
    T->last_id = (uint32_t)i;
    return i;
}

static int table_grow_slots(Table *T)
{
    size_t size = T->mask ? (T->mask + 1) * 2 : 1024;
    uint32_t *slots = PyMem_Calloc(size, sizeof(uint32_t));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < T->used; k++) {
        entry_t *e = &T->entries[k];
        uint64_t h = key_hash(T->arena + e->user, E_LEN(e), E_MINUTE(e));
        size_t i = (size_t)h & (size - 1);
        while (slots[i])
            i = (i + 1) & (size - 1);
        slots[i] = (uint32_t)(k + 1);
    }
    PyMem_Free(T->slots);
    T->slots = slots;
    T->mask = size - 1;
    return 0;
}

/* Move an entry's sums to T->extra (added to what is there), leaving it at zero. */
static int table_spill(Table *T, entry_t *e)
{
    PyObject *user = PyUnicode_FromStringAndSize(T->arena + e->user, E_LEN(e));
    PyObject *key = user ? PyTuple_Pack(2, user, PyList_GET_ITEM(T->minutes, E_MINUTE(e))) : NULL;
    Py_XDECREF(user);
    if (key == NULL)
        return -1;
    PyObject *s = PyDict_GetItemWithError(T->extra, key);
    int r = 0;
    if (s == NULL) {
        s = PyErr_Occurred() ? NULL : PyList_New(4);
        if (s == NULL) {
            Py_DECREF(key);
            return -1;
        }
        for (int i = 0; i < 4; i++) {
            Py_INCREF(ZERO);
            PyList_SET_ITEM(s, i, ZERO);
        }
        r = PyDict_SetItem(T->extra, key, s);
        Py_DECREF(s); /* the dict holds it */
    }
    Py_DECREF(key);
    for (int i = 0; i < 4 && r == 0; i++) {
        PyObject *v = i % 2 == 0 ? PyLong_FromUnsignedLong(e->count[i / 2])
                                 : PyLong_FromUnsignedLongLong(e->amount[i / 2]);
        PyObject *sum = v ? PyNumber_Add(PyList_GET_ITEM(s, i), v) : NULL;
        Py_XDECREF(v);
        r = sum == NULL ? -1 : PyList_SetItem(s, i, sum);
    }
    if (r == 0) {
        e->count[0] = e->count[1] = 0;
        e->amount[0] = e->amount[1] = 0;
    }
    return r;
}

/* parser.add for a line this loop took: count one event of `value` under (user, minute). */
static int table_add(Table *T, const char *user, Py_ssize_t n, uint32_t minute, int is_add, uint64_t value)
{
    int k = !is_add;
    uint32_t key = minute << 8 | (uint32_t)(n - 1);
    uint64_t h = key_hash(user, n, minute);
    if (T->mask == 0 && table_grow_slots(T) < 0)
        return -1;
    size_t i = (size_t)h & T->mask;
    for (;; i = (i + 1) & T->mask) {
        uint32_t s = T->slots[i];
        if (s == 0)
            break;
        entry_t *e = &T->entries[s - 1];
        if (e->key != key || memcmp(T->arena + e->user, user, n) != 0)
            continue;
        if ((e->count[k] == UINT32_MAX || e->amount[k] + value < e->amount[k]) && table_spill(T, e) < 0)
            return -1;
        e->count[k]++;
        e->amount[k] += value;
        T->events++;
        return 0;
    }
    /* a new key */
    if (T->used == T->cap) { /* a quarter more at a time: little reserved beyond the keys */
        Py_ssize_t cap = T->cap ? T->cap + T->cap / 4 : 512;
        entry_t *grown = PyMem_Realloc(T->entries, cap * sizeof(entry_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        T->entries = grown, T->cap = cap;
    }
    if (T->arena_used + n > T->arena_cap) {
        size_t cap = T->arena_cap ? T->arena_cap + T->arena_cap / 4 : 8192;
        if (cap < T->arena_used + n)
            cap = T->arena_used + n;
        if (cap > UINT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "a sums table holds at most 4 GiB of user ids");
            return -1;
        }
        char *grown = PyMem_Realloc(T->arena, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        T->arena = grown, T->arena_cap = cap;
    }
    if (T->used >= (Py_ssize_t)UINT32_MAX - 1) {
        PyErr_SetString(PyExc_OverflowError, "a sums table holds at most 2**32 - 2 keys");
        return -1;
    }
    entry_t *e = &T->entries[T->used];
    e->user = (uint32_t)T->arena_used;
    e->key = key;
    e->count[k] = 1, e->count[!k] = 0;
    e->amount[k] = value, e->amount[!k] = 0;
    memcpy(T->arena + T->arena_used, user, n);
    T->arena_used += n;
    T->slots[i] = (uint32_t)(T->used + 1);
    T->used++;
    T->events++;
    if ((size_t)T->used * 10 > (T->mask + 1) * 7) /* at most 7/10 full: short probes */
        return table_grow_slots(T);
    return 0;
}

/* Table.rows(start=0, stop=len): entries [start, stop) as COPY rows `user \t minute \t adds \t added \t subtracts \t
 * subtracted`, as store.copy_rows writes them (the users need no escape: printable ASCII without
 * a backslash). The extra sums are the caller's to add (store.copy_rows of `extra`). */
static PyObject *table_rows(Table *T, PyObject *args)
{
    Py_ssize_t start = 0, stop = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTuple(args, "|nn:rows", &start, &stop))
        return NULL;
    start = start < 0 ? 0 : start > T->used ? T->used : start;
    stop = stop < start ? start : stop > T->used ? T->used : stop;
    Py_ssize_t nm = PyList_GET_SIZE(T->minutes);
    const char **mtext = PyMem_Calloc(nm ? nm : 1, sizeof(char *));
    Py_ssize_t *mlen = PyMem_Calloc(nm ? nm : 1, sizeof(Py_ssize_t));
    if (mtext == NULL || mlen == NULL) {
        PyMem_Free(mtext);
        PyMem_Free(mlen);
        return PyErr_NoMemory();
    }
    Py_ssize_t bound = 0;
    for (Py_ssize_t m = 0; m < nm; m++) {
        mtext[m] = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(T->minutes, m), &mlen[m]);
        if (mtext[m] == NULL) {
            PyMem_Free(mtext);
            PyMem_Free(mlen);
            return NULL;
        }
    }
    /* a row: the id, a tab, the minute, four tabs and a newline, 2 x 10 + 2 x 20 digits at most
     * (sprintf's closing NUL goes to the byte a bytes object keeps past its size) */
    for (Py_ssize_t k = start; k < stop; k++)
        bound += E_LEN(&T->entries[k]) + mlen[E_MINUTE(&T->entries[k])] + 6 + 2 * 10 + 2 * 20;
    PyObject *out = PyBytes_FromStringAndSize(NULL, bound);
    if (out == NULL) {
        PyMem_Free(mtext);
        PyMem_Free(mlen);
        return NULL;
    }
    char *w = PyBytes_AS_STRING(out);
    for (Py_ssize_t k = start; k < stop; k++) {
        entry_t *e = &T->entries[k];
        if (e->count[0] == 0 && e->count[1] == 0)
            continue; /* all of it in extra */
        memcpy(w, T->arena + e->user, E_LEN(e));
        w += E_LEN(e);
        *w++ = '\t';
        memcpy(w, mtext[E_MINUTE(e)], mlen[E_MINUTE(e)]);
        w += mlen[E_MINUTE(e)];
        w += sprintf(w, "\t%u\t%llu\t%u\t%llu\n", e->count[0], (unsigned long long)e->amount[0], e->count[1],
                     (unsigned long long)e->amount[1]);
    }
    PyMem_Free(mtext);
    PyMem_Free(mlen);
    if (_PyBytes_Resize(&out, w - PyBytes_AS_STRING(out)) < 0)
        return NULL;
    return out;
}

/* Table.users(): hash() of each distinct user, as the bytes of int64s (array("q")): the same
 * as hash(str) of its id (ASCII: a str hashes its bytes), without making the str. */
static PyObject *table_users(Table *T, PyObject *unused)
{
    size_t size = 16;
    while (size < (size_t)T->used * 2)
        size *= 2;
    int64_t *seen = PyMem_Calloc(size, sizeof(int64_t));
    char *zero = PyMem_Calloc(size, 1); /* a slot holding the hash 0 */
    PyObject *out = PyBytes_FromStringAndSize(NULL, T->used * (Py_ssize_t)sizeof(int64_t));
    if (seen == NULL || zero == NULL || out == NULL) {
        PyMem_Free(seen);
        PyMem_Free(zero);
        Py_XDECREF(out);
        return PyErr_NoMemory();
    }
    int64_t *w = (int64_t *)PyBytes_AS_STRING(out);
    Py_ssize_t got = 0;
    for (Py_ssize_t k = 0; k < T->used; k++) {
        entry_t *e = &T->entries[k];
        int64_t h = (int64_t)_Py_HashBytes(T->arena + e->user, E_LEN(e));
        size_t i = (size_t)((uint64_t)h * 0x9E3779B97F4A7C15ULL >> 17) & (size - 1);
        while ((seen[i] != 0 || zero[i]) && seen[i] != h)
            i = (i + 1) & (size - 1);
        if (seen[i] == h && (h != 0 || zero[i]))
            continue;
        seen[i] = h;
        zero[i] = h == 0;
        w[got++] = h;
    }
    PyMem_Free(seen);
    PyMem_Free(zero);
    if (_PyBytes_Resize(&out, got * (Py_ssize_t)sizeof(int64_t)) < 0)
        return NULL;
    return out;
}

/* Table.to_dict(): every key's sums as parser.Sums (with the extra sums added): for the tests. */
static PyObject *table_to_dict(Table *T, PyObject *unused)
{
    PyObject *d = PyDict_New();
    for (Py_ssize_t k = 0; d != NULL && k < T->used; k++) {
        entry_t *e = &T->entries[k];
        PyObject *user = PyUnicode_FromStringAndSize(T->arena + e->user, E_LEN(e));
        PyObject *key = user ? PyTuple_Pack(2, user, PyList_GET_ITEM(T->minutes, E_MINUTE(e))) : NULL;
        PyObject *s = key ? Py_BuildValue("[kKkK]", (unsigned long)e->count[0], (unsigned long long)e->amount[0],
                                          (unsigned long)e->count[1], (unsigned long long)e->amount[1])
                          : NULL;
        if (s == NULL || PyDict_SetItem(d, key, s) < 0)
            Py_CLEAR(d);
        Py_XDECREF(s);
        Py_XDECREF(key);
        Py_XDECREF(user);
    }
    PyObject *key, *more;
    Py_ssize_t pos = 0;
    while (d != NULL && PyDict_Next(T->extra, &pos, &key, &more)) {
        PyObject *s = PyDict_GetItemWithError(d, key);
        if (s == NULL) {
            if (PyErr_Occurred() || (s = PyList_GetSlice(more, 0, 4)) == NULL || PyDict_SetItem(d, key, s) < 0)
                Py_CLEAR(d);
            Py_XDECREF(s);
            continue;
        }
        for (int i = 0; i < 4; i++) {
            PyObject *sum = PyNumber_Add(PyList_GET_ITEM(s, i), PyList_GET_ITEM(more, i));
            if (sum == NULL || PyList_SetItem(s, i, sum) < 0) {
                Py_CLEAR(d);
                break;
            }
        }
    }
    return d;
}

static PyObject *table_count(Table *T, void *unused) { return PyLong_FromLongLong(T->events); }

/* Table.held: the bytes its keys take, growing smoothly with them (what parser.held bounds): an
 * entry, 8 bytes of index (between 7/20 and 7/10 full) and the id's bytes each. What it reserves
 * (nbytes) is at most about a quarter more, and the index's doubling. */
static PyObject *table_held(Table *T, void *unused)
{
    return PyLong_FromSize_t((size_t)T->used * (sizeof(entry_t) + 8) + T->arena_used +
                             (size_t)PyList_GET_SIZE(T->minutes) * 120);
}

static PyObject *table_nbytes(Table *T, void *unused)
{
    return PyLong_FromSize_t(sizeof(Table) + (size_t)T->cap * sizeof(entry_t) +
                             (T->mask ? (T->mask + 1) * sizeof(uint32_t) : 0) + T->arena_cap +
                             (size_t)PyList_GET_SIZE(T->minutes) * 120);
}

static PyObject *table_extra(Table *T, void *unused) { return Py_NewRef(T->extra); }

static Py_ssize_t table_len(Table *T) { return T->used; }

static PyMethodDef table_methods[] = {
    {"rows", (PyCFunction)table_rows, METH_VARARGS,
     "rows(start=0, stop=len) -> bytes: those entries' COPY rows (store.copy_rows)."},
    {"users", (PyCFunction)table_users, METH_NOARGS, "users() -> bytes: hash() of each distinct user, int64s."},
    {"to_dict", (PyCFunction)table_to_dict, METH_NOARGS, "to_dict() -> parser.Sums of every key."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef table_getset[] = {
    {"count", (getter)table_count, NULL, "events summed", NULL},
    {"nbytes", (getter)table_nbytes, NULL, "bytes of memory reserved", NULL},
    {"held", (getter)table_held, NULL, "bytes its keys take (growing smoothly with them)", NULL},
    {"extra", (getter)table_extra, NULL, "sums moved out before they overflowed (parser.Sums)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods table_seq = {.sq_length = (lenfunc)table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "evtool._fastlines.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sums per (user, minute) of the lines sum_lines took, held in C.",
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_getset = table_getset,
    .tp_as_sequence = &table_seq,
};


/* parser._SenderCells, for the span of one call. */
typedef struct {
    char source[16];
    int have;
    PyObject *part, *cells, *in_order, *table; /* owned */
    long long n;
    PyObject *cell; /* owned */
} senders_t;

static void senders_clear(senders_t *S)
{
    Py_CLEAR(S->part);
    Py_CLEAR(S->cells);
    Py_CLEAR(S->in_order);
    Py_CLEAR(S->table);
    Py_CLEAR(S->cell);
}

static inline long long cell_of(long long n) { return n < 0 ? -1 : n / CELL_LINES; }

/* _SenderCells.add: file the entry of line `number` (chain: 16 hex digits or NULL) of `source`;
 * its source's sums table (borrowed from S), or NULL on an error. */
static Table *sender_add(senders_t *S, PyObject *sources, const char *source, long long number,
                            const unsigned char chain[8])
{
    long long n = number - 1;
    if (!S->have || memcmp(S->source, source, 16) != 0) {
        PyObject *name = PyUnicode_FromStringAndSize(source, 16);
        if (name == NULL)
            return NULL;
        PyObject *part = PyDict_GetItemWithError(sources, name);
        if (part != NULL) {
            Py_INCREF(part);
        } else if (PyErr_Occurred()) {
            Py_DECREF(name);
            return NULL;
        } else {
            part = PyObject_CallNoArgs(SourcePart);
            if (part == NULL || PyDict_SetItem(sources, name, part) < 0) {
                Py_XDECREF(part);
                Py_DECREF(name);
                return NULL;
            }
        }
        Py_DECREF(name);
        senders_clear(S);
        S->part = part;
        S->cells = PyObject_GetAttr(part, s_cells);
        S->in_order = PyObject_GetAttr(part, s_in_order);
        S->table = PyObject_GetAttr(part, s_table);
        if (S->cells == NULL || S->in_order == NULL || S->table == NULL)
            return NULL;
        if (!PyDict_Check(S->cells) || !PySet_Check(S->in_order) || !Py_IS_TYPE(S->table, &TableType)) {
            PyErr_SetString(PyExc_TypeError, "a SourcePart's cells is a dict, its in_order a set, its table a Table");
            return NULL;
        }
        memcpy(S->source, source, 16);
        S->have = 1;
        S->n = -1;
    }
    long long cell_no = n / CELL_LINES;
    int slot = (int)(n % CELL_LINES);
    if (cell_no != cell_of(S->n)) {
        PyObject *key = PyLong_FromLongLong(cell_no);
        if (key == NULL)
            return NULL;
        PyObject *cell = PyDict_GetItemWithError(S->cells, key);
        if (cell != NULL) {
            if (!PyByteArray_CheckExact(cell)) {
                Py_DECREF(key);
                PyErr_SetString(PyExc_TypeError, "a cell being filled is a bytearray");
                return NULL;
            }
            Py_INCREF(cell);
            Py_ssize_t len = PyByteArray_GET_SIZE(cell);
            if (len >= ENTRY) { /* back to a cell, below its last line */
                const unsigned char *last = (const unsigned char *)PyByteArray_AS_STRING(cell) + len - ENTRY;
                if ((last[0] << 8 | last[1]) >= slot && PySet_Discard(S->in_order, key) < 0) {
                    Py_DECREF(cell);
                    Py_DECREF(key);
                    return NULL;
                }
            }
        } else if (PyErr_Occurred()) {
            Py_DECREF(key);
            return NULL;
        } else {
            cell = PyByteArray_FromStringAndSize(NULL, 0);
            if (cell == NULL || PyDict_SetItem(S->cells, key, cell) < 0 || PySet_Add(S->in_order, key) < 0) {
                Py_XDECREF(cell);
                Py_DECREF(key);
                return NULL;
            }
        }
        Py_DECREF(key);
        Py_XSETREF(S->cell, cell);
    } else if (n <= S->n) {
        PyObject *key = PyLong_FromLongLong(cell_no);
        if (key == NULL)
            return NULL;
        int r = PySet_Discard(S->in_order, key);
        Py_DECREF(key);
        if (r < 0)
            return NULL;
    }
    S->n = n;
    Py_ssize_t len = PyByteArray_GET_SIZE(S->cell);
    if (PyByteArray_Resize(S->cell, len + ENTRY) < 0)
        return NULL;
    unsigned char *e = (unsigned char *)PyByteArray_AS_STRING(S->cell) + len;
    e[0] = (unsigned char)(slot >> 8);
    e[1] = (unsigned char)(slot & 0xff);
    memcpy(e + 2, chain, 8);
    return (Table *)S->table;
}

/* BLAKE2b of a contiguous message (defined with the sender's loop, below). */
static void b2_digest(unsigned char *out, int outlen, const unsigned char person[16], const unsigned char *msg,
                      Py_ssize_t n);

/* identity._CONTENT_HASH's personalisation, zero-padded to the parameter block's 16 bytes. */
static const unsigned char CONTENT_PERSON[16] = "evtool-content";

#define DIGEST_ROW 58 /* store.DIGEST_ROW: a batch_digests row in COPY's binary format */
#define REPEAT 48     /* parser.REPEAT: a later occurrence of an id in a batch (claim_rows) */

static inline unsigned char *put_be(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)(v & 0xff);
    return p + bytes;
}

/* An opaque-id line without a Python object (the fast mode of sum_lines): its digests
 * (identity.event_digest, identity.content_digest, computed here) as one store.DIGEST_ROW
 * appended to `rows` (digest, content, the part's offset, the line's index in the part, as
 * parser.ParsedPart.finish packs them), its sums into `T`. */
static int opaque_row(Table *T, PyObject *rows, const line_t *L, uint32_t minute, int is_add,
                      long long part_offset, Py_ssize_t index)
{
    unsigned char row[DIGEST_ROW], text[MAX_USER_ID + 3 + 24], *r = row;
    r = put_be(r, 4, 2);
    r = put_be(r, 16, 4);
    b2_digest(r, 16, NULL, (const unsigned char *)L->eid.p, L->eid.n);
    r = put_be(r + 16, 8, 4);
    /* format_value's text of an int: "user\0+\0digits" (content_digest) */
    memcpy(text, L->user.p, L->user.n);
    Py_ssize_t n = L->user.n;
    text[n++] = 0;
    text[n++] = is_add ? '+' : '-';
    text[n++] = 0;
    n += snprintf((char *)text + n, 24, "%lld", L->value);
    b2_digest(r, 8, CONTENT_PERSON, text, n);
    r = put_be(r + 8, 8, 4);
    r = put_be(r, (uint64_t)part_offset, 8);
    r = put_be(r, 8, 4);
    put_be(r, (uint64_t)index, 8);
    Py_ssize_t size = PyByteArray_GET_SIZE(rows);
    if (PyByteArray_Resize(rows, size + DIGEST_ROW) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(rows) + size, row, DIGEST_ROW);
    return table_add(T, L->user.p, L->user.n, minute, is_add, (uint64_t)L->value);
}

static PyObject *sum_lines(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t pos, offset, index;
    PyObject *fresh, *sources, *opaque, *rows = Py_None;
    long long part_offset = 0;
    if (!PyArg_ParseTuple(args, "y*nnnO!O!O|OL:sum_lines", &buf, &pos, &offset, &index, &TableType, &fresh,
                          &PyDict_Type, &sources, &opaque, &rows, &part_offset))
        return NULL;
    /* opaque ids: a list of tuples (the Python loops' form), or a Table with `rows` a bytearray */
    int fast = rows != Py_None;
    if (fast ? !PyObject_TypeCheck(opaque, &TableType) || !PyByteArray_Check(rows) : !PyList_Check(opaque)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_TypeError, "sum_lines: opaque must be a list, or a Table with a bytearray of rows");
        return NULL;
    }
    if (SourcePart == NULL) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_RuntimeError, "_fastlines.configure was not called");
        return NULL;
    }
    const char *data = buf.buf, *end = data + buf.len;
    const char *p = data + (pos < 0 ? 0 : pos > buf.len ? buf.len : pos);
    senders_t S = {{0}, 0, NULL, NULL, NULL, NULL, -1, NULL};
    span ts_prev = {NULL, -1};
    PyObject *minute_prev = NULL; /* owned: the minute of ts_prev */
    int failed = 0;

    while (p < end) {
        const char *nl = memchr(p, '\n', end - p);
        line_t L;
        if (nl == NULL || !read_line(p, nl, &L, K_USER | K_NAME | K_VALUE | K_EID | K_TS))
            break;
        /* the minute, as eventtime.STAMP_MINUTE / stamp_minute give it (the same text as the
         * line before: the same minute, serve stamps many lines alike) */
        PyObject *minute;
        if (!(L.has & K_TS)) {
            minute = EMPTY;
            Py_INCREF(minute);
        } else if (minute_prev != NULL && L.ts.n == ts_prev.n && memcmp(L.ts.p, ts_prev.p, L.ts.n) == 0) {
            minute = minute_prev;
            Py_INCREF(minute);
        } else {
            PyObject *t = PyUnicode_FromStringAndSize(L.ts.p, L.ts.n);
            if (t == NULL) {
                failed = 1;
                break;
            }
            minute = PyDict_GetItemWithError(stamp_minutes, t);
            if (minute != NULL)
                Py_INCREF(minute);
            else if (!PyErr_Occurred())
                minute = PyObject_CallOneArg(stamp_minute, t);
            Py_DECREF(t);
            if (minute == NULL) {
                failed = 1;
                break;
            }
            if (minute == Py_None) { /* not a canonical stamp: the validator says why */
                Py_DECREF(minute);
                break;
            }
            Py_INCREF(minute);
            Py_XSETREF(minute_prev, minute);
            ts_prev = L.ts;
        }
        /* where the event goes; decided before anything is changed for it */
        long long number = 0;
        unsigned char chain[8];
        enum { FRESH, SENDER, OPAQUE } kind;
        if (!(L.has & K_EID))
            kind = FRESH;
        else if (sender_id(L.eid, &number, chain))
            kind = SENDER;
        else if (L.eid.n > 0 && L.eid.n <= MAX_EVENT_ID)
            kind = L.eid.p[0] == '~' ? FRESH : OPAQUE; /* events.RECEIVER_ID_PREFIX: a receiver id */
        else {
            Py_DECREF(minute);
            break;
        }
        int is_add = L.name.n == 11; /* add_revenue (read_line checked it is one of the two) */
        PyObject *value = NULL; /* made only where an object is needed: not for a key seen before */
        int r = 0;
        if (kind == OPAQUE && fast) {
            long long m = table_minute((Table *)opaque, minute);
            r = m < 0 ? -1 : opaque_row((Table *)opaque, rows, &L, (uint32_t)m, is_add, part_offset, index);
        } else if (kind == OPAQUE) {
            value = PyLong_FromLongLong(L.value);
            PyObject *user = value ? PyUnicode_FromStringAndSize(L.user.p, L.user.n) : NULL;
            PyObject *key = user ? PyTuple_Pack(2, user, minute) : NULL;
            PyObject *eid = key ? PyUnicode_FromStringAndSize(L.eid.p, L.eid.n) : NULL;
            PyObject *flag = PyBool_FromLong(is_add);
            PyObject *d = eid ? PyObject_CallOneArg(event_digest, eid) : NULL;
            PyObject *c = d ? PyObject_CallFunctionObjArgs(content_digest, user, flag, value, NULL) : NULL;
            PyObject *row = c ? Py_BuildValue("(OOOOOnn)", d, c, key, flag, value, offset + (p - data), index)
                              : NULL;
            r = row == NULL ? -1 : PyList_Append(opaque, row);
            Py_XDECREF(row);
            Py_XDECREF(c);
            Py_XDECREF(d);
            Py_DECREF(flag);
            Py_XDECREF(eid);
            Py_XDECREF(key);
            Py_XDECREF(user);
        } else {
            Table *T = kind == FRESH ? (Table *)fresh : sender_add(&S, sources, L.eid.p, number, chain);
            long long m = T == NULL ? -1 : table_minute(T, minute);
            r = m < 0 ? -1 : table_add(T, L.user.p, L.user.n, (uint32_t)m, is_add, (uint64_t)L.value);
        }
        Py_XDECREF(value);
        Py_DECREF(minute);
        if (value == NULL && r == 0 && PyErr_Occurred())
            r = -1;
        if (r < 0) {
            failed = 1;
            break;
        }
        index++;
        p = nl + 1;
    }
    senders_clear(&S);
    Py_XDECREF(minute_prev);
    PyBuffer_Release(&buf);
    if (failed)
        return NULL;
    return Py_BuildValue("nn", (Py_ssize_t)(p - data), index);
}

/* sort_digest_rows(rows) -> bool: sort a bytearray of store.DIGEST_ROW rows by digest, in place,
 * an id's occurrences by line, and say whether a digest occurs twice (an id repeated within the
 * part: parser._repeats). A
 * worker's part arrives sorted, so the committing process merges the parts (claim_rows). By the
 * digest's first two bytes into 65,536 buckets (digests are uniform), then each bucket by
 * insertion (a crowded one by qsort): linear in the rows, where a qsort of them all cost several
 * times as much. */
static int row_cmp(const unsigned char *a, const unsigned char *b)
{
    int c = memcmp(a + 6, b + 6, 16);
    return c ? c : memcmp(a + 50, b + 50, 8); /* an id's occurrences by line (big-endian index) */
}
static int row_qcmp(const void *a, const void *b) { return row_cmp(a, b); }

/* sort_repeats(repeats): claim_rows' REPEAT records in line order (their first 8 bytes: the
 * index, big-endian, never negative, so bytes compare as numbers; no two the same). */
static int repeat_qcmp(const void *a, const void *b) { return memcmp(a, b, 8); }

static PyObject *sort_repeats(PyObject *self, PyObject *args)
{
    PyObject *repeats;
    if (!PyArg_ParseTuple(args, "O!:sort_repeats", &PyByteArray_Type, &repeats))
        return NULL;
    Py_ssize_t n = PyByteArray_GET_SIZE(repeats);
    if (n % REPEAT) {
        PyErr_SetString(PyExc_ValueError, "sort_repeats: not whole REPEAT records");
        return NULL;
    }
    if (n)
        qsort(PyByteArray_AS_STRING(repeats), (size_t)(n / REPEAT), REPEAT, repeat_qcmp);
    Py_RETURN_NONE;
}

static PyObject *sort_digest_rows(PyObject *self, PyObject *args)
{
    PyObject *rows;
    if (!PyArg_ParseTuple(args, "O!:sort_digest_rows", &PyByteArray_Type, &rows))
        return NULL;
    Py_ssize_t n = PyByteArray_GET_SIZE(rows) / DIGEST_ROW;
    if (n > 0xffffffffLL) { /* never: a part holds far fewer (parser.MAX_HELD) */
        PyErr_SetString(PyExc_OverflowError, "sort_digest_rows: too many rows");
        return NULL;
    }
    unsigned char *all = (unsigned char *)PyByteArray_AS_STRING(rows);
    uint32_t *start = PyMem_Calloc(65536 + 1, sizeof(uint32_t)), *fill = PyMem_Malloc(65536 * sizeof(uint32_t));
    unsigned char *out = PyMem_Malloc((size_t)(n ? n : 1) * DIGEST_ROW);
    if (start == NULL || fill == NULL || out == NULL) {
        PyMem_Free(start);
        PyMem_Free(fill);
        PyMem_Free(out);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *d = all + i * DIGEST_ROW + 6;
        start[(d[0] << 8 | d[1]) + 1]++;
    }
    for (int b = 0; b < 65536; b++)
        start[b + 1] += start[b];
    memcpy(fill, start, 65536 * sizeof(uint32_t));
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *r = all + i * DIGEST_ROW, *d = r + 6;
        memcpy(out + (size_t)fill[d[0] << 8 | d[1]]++ * DIGEST_ROW, r, DIGEST_ROW);
    }
    int twice = 0;
    unsigned char tmp[DIGEST_ROW];
    for (int b = 0; b < 65536; b++) {
        unsigned char *lo = out + (size_t)start[b] * DIGEST_ROW, *hi = out + (size_t)start[b + 1] * DIGEST_ROW;
        if (start[b + 1] - start[b] > 32) { /* ids chosen to crowd one bucket: never quadratic */
            qsort(lo, start[b + 1] - start[b], DIGEST_ROW, row_qcmp);
        } else {
            for (unsigned char *r = lo + DIGEST_ROW; r < hi; r += DIGEST_ROW) {
                unsigned char *q = r;
                memcpy(tmp, r, DIGEST_ROW);
                while (q > lo && row_cmp(q - DIGEST_ROW, tmp) > 0) {
                    memcpy(q, q - DIGEST_ROW, DIGEST_ROW);
                    q -= DIGEST_ROW;
                }
                memcpy(q, tmp, DIGEST_ROW);
            }
        }
        for (unsigned char *r = lo + DIGEST_ROW; r < hi && !twice; r += DIGEST_ROW)
            twice = memcmp(r - DIGEST_ROW + 6, r + 6, 16) == 0;
    }
    memcpy(all, out, (size_t)n * DIGEST_ROW);
    PyMem_Free(start);
    PyMem_Free(fill);
    PyMem_Free(out);
    return PyBool_FromLong(twice);
}

static inline uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int j = 0; j < 8; j++)
        v = v << 8 | p[j];
    return v;
}

/* claim_rows(parts, bases, fingerprint, first_line, at, limit, last, repeats) -> bytes: the rows
 * of applied_events (digest, content, journal, line_no) in COPY's binary format, merged in digest
 * order from `parts` (each a buffer of DIGEST_ROW rows sorted by sort_digest_rows), taking up to
 * `limit` of their rows: journal the fingerprint, line_no first_line + the part's base (lines
 * before it in the batch) + the row's index. An id's later occurrences (a client's retry, in one
 * part or two) are not written but appended to `repeats`, a bytearray, as REPEAT records: index
 * in the batch, digest, content, the first's content, the first's index (48 bytes, the indexes
 * big-endian: sort_repeats puts them in line order). `at` (a row index per part) and `last` (a
 * bytearray: the last id written, its content and index) carry the merge from call to call. */
static PyObject *claim_rows(PyObject *self, PyObject *args)
{
    PyObject *parts, *bases, *at, *last, *repeats;
    Py_buffer fp;
    long long first_line;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!O!y*LO!nO!O!:claim_rows", &PyList_Type, &parts, &PyList_Type, &bases, &fp,
                          &first_line, &PyList_Type, &at, &limit, &PyByteArray_Type, &last, &PyByteArray_Type,
                          &repeats))
        return NULL;
    /* the last id written: digest (16), content (8), index in the batch (8, native) */
    unsigned char prev[32];
    int have_prev = PyByteArray_GET_SIZE(last) == 32;
    if (have_prev)
        memcpy(prev, PyByteArray_AS_STRING(last), 32);
    Py_ssize_t k = PyList_GET_SIZE(parts);
    PyObject *out = NULL;
    Py_buffer *bufs = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Py_buffer));
    Py_ssize_t *pos = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Py_ssize_t));
    long long *base = PyMem_Calloc((size_t)(k ? k : 1), sizeof(long long));
    Py_ssize_t got = 0, rows = 0, row_size = 2 + 4 + 16 + 4 + 8 + 4 + fp.len + 4 + 8;
    if (bufs == NULL || pos == NULL || base == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyList_GET_SIZE(bases) != k || PyList_GET_SIZE(at) != k) {
        PyErr_SetString(PyExc_ValueError, "claim_rows: parts, bases and at differ in length");
        goto done;
    }
    for (; got < k; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(parts, got), &bufs[got], PyBUF_SIMPLE) < 0)
            goto done;
        pos[got] = PyLong_AsSsize_t(PyList_GET_ITEM(at, got));
        base[got] = PyLong_AsLongLong(PyList_GET_ITEM(bases, got));
        if (PyErr_Occurred()) {
            got++;
            goto done;
        }
        Py_ssize_t n = bufs[got].len / DIGEST_ROW;
        rows += pos[got] < 0 ? 0 : pos[got] > n ? 0 : n - pos[got];
    }
    if (rows > limit)
        rows = limit;
    out = PyBytes_FromStringAndSize(NULL, rows * row_size);
    if (out == NULL)
        goto done;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out), *w0 = w;
    for (Py_ssize_t r = 0; r < rows; r++) {
        int best = -1;
        const unsigned char *row = NULL;
        for (Py_ssize_t i = 0; i < k; i++) { /* a few parts: the smallest head by a scan */
            if (pos[i] < 0 || pos[i] >= bufs[i].len / DIGEST_ROW)
                continue;
            const unsigned char *c = (const unsigned char *)bufs[i].buf + pos[i] * DIGEST_ROW;
            /* strictly smaller: of an id in two parts, the earlier part's (its lines come first) */
            if (best < 0 || memcmp(c + 6, row + 6, 16) < 0) {
                best = (int)i;
                row = c;
            }
        }
        pos[best]++;
        long long line = base[best] + (long long)be64(row + 50); /* the line's index in the batch */
        if (have_prev && memcmp(prev, row + 6, 16) == 0) { /* again: the first was written */
            long long first;
            memcpy(&first, prev + 24, 8);
            Py_ssize_t n = PyByteArray_GET_SIZE(repeats);
            if (PyByteArray_Resize(repeats, n + REPEAT) < 0) { /* (grows by a share: amortized) */
                Py_CLEAR(out);
                goto done;
            }
            unsigned char *rp = (unsigned char *)PyByteArray_AS_STRING(repeats) + n;
            rp = put_be(rp, (uint64_t)line, 8);
            memcpy(rp, row + 6, 16);
            memcpy(rp + 16, row + 26, 8);
            memcpy(rp + 24, prev + 16, 8);
            put_be(rp + 32, (uint64_t)first, 8);
            continue;
        }
        memcpy(prev, row + 6, 16);
        memcpy(prev + 16, row + 26, 8);
        memcpy(prev + 24, &line, 8);
        have_prev = 1;
        /* DIGEST_ROW: count, len 16, digest (6), len 8, content (26), len 8, part, len 8, index (50) */
        w = put_be(w, 4, 2);
        memcpy(w, row + 2, 4 + 16 + 4 + 8); /* the digest and content fields as they are */
        w += 4 + 16 + 4 + 8;
        w = put_be(w, (uint64_t)fp.len, 4);
        memcpy(w, fp.buf, fp.len);
        w += fp.len;
        w = put_be(w, 8, 4);
        w = put_be(w, (uint64_t)(first_line + line), 8);
    }
    if (_PyBytes_Resize(&out, w - w0) < 0)
        goto done;
    if (have_prev) {
        if (PyByteArray_Resize(last, 32) < 0) {
            Py_CLEAR(out);
            goto done;
        }
        memcpy(PyByteArray_AS_STRING(last), prev, 32);
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *v = PyLong_FromSsize_t(pos[i]);
        if (v == NULL || PyList_SetItem(at, i, v) < 0) {
            Py_CLEAR(out);
            break;
        }
    }
done:
    for (Py_ssize_t i = 0; i < got; i++)
        if (bufs[i].obj != NULL)
            PyBuffer_Release(&bufs[i]);
    PyBuffer_Release(&fp);
    PyMem_Free(bufs);
    PyMem_Free(pos);
    PyMem_Free(base);
    return out;
}

/* -- the sender's id loop (sender._id_lines) ------------------------------------------------------ */

/* BLAKE2b (RFC 7693) with an 8-byte digest, no key: identity.chain_next's hash, written here so
 * that a line's chain costs no Python object. tests/test_sender.py pins it to hashlib's. */
static const uint64_t B2_IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};
static const unsigned char B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const unsigned char *p) /* little endian, as BLAKE2b reads words */
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
#endif
}

#define B2_G(a, b, c, d, x, y)                                                                           \
    do {                                                                                                 \
        a = a + b + (x);                                                                                 \
        d = rotr64(d ^ a, 32);                                                                           \
        c = c + d;                                                                                       \
        b = rotr64(b ^ c, 24);                                                                           \
        a = a + b + (y);                                                                                 \
        d = rotr64(d ^ a, 16);                                                                           \
        c = c + d;                                                                                       \
        b = rotr64(b ^ c, 63);                                                                           \
    } while (0)

static void b2_compress(uint64_t h[8], const unsigned char block[128], uint64_t t, int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = B2_IV[i];
    }
    v[12] ^= t;
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const unsigned char *s = B2_SIGMA[r];
        B2_G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        B2_G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        B2_G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        B2_G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        B2_G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        B2_G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        B2_G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        B2_G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

/* blake2b(msg, digest_size=outlen, person=person) into out (no key, no salt). */
static void b2_digest(unsigned char *out, int outlen, const unsigned char person[16], const unsigned char *msg,
                      Py_ssize_t n)
{
    uint64_t h[8];
    unsigned char block[128];
    memcpy(h, B2_IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ (uint64_t)outlen; /* depth 1, fanout 1, no key */
    if (person != NULL) {
        h[6] ^= load64(person);
        h[7] ^= load64(person + 8);
    }
    uint64_t done = 0;
    while (n - (Py_ssize_t)done > 128) {
        done += 128;
        b2_compress(h, msg + done - 128, done, 0);
    }
    Py_ssize_t rest = n - (Py_ssize_t)done;
    memcpy(block, msg + done, rest);
    memset(block + rest, 0, 128 - rest);
    b2_compress(h, block, (uint64_t)n, 1);
    for (int i = 0; i < outlen; i++)
        out[i] = (unsigned char)(h[i / 8] >> (8 * (i % 8)));
}

/* blake2b(a + b, digest_size=8) into out[8]: `a` the 8-byte chain, `b` the line. */
static void chain_next(const unsigned char a[8], const unsigned char *b, Py_ssize_t n, unsigned char out[8])
{
    uint64_t h[8];
    unsigned char block[128];
    memcpy(h, B2_IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ 8; /* depth 1, fanout 1, no key, an 8-byte digest */
    uint64_t total = 8 + (uint64_t)n, done = 0;
    Py_ssize_t fill = 8, at = 0; /* bytes in `block`; bytes of b taken */
    memcpy(block, a, 8);
    for (;;) {
        Py_ssize_t take = n - at < 128 - fill ? n - at : 128 - fill;
        memcpy(block + fill, b + at, take);
        fill += take;
        at += take;
        if (at == n) { /* the last block, zero-padded (total > 0: it holds the chain at least) */
            memset(block + fill, 0, 128 - fill);
            b2_compress(h, block, total, 1);
            break;
        }
        done += 128;
        b2_compress(h, block, done, 0);
        fill = 0;
    }
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(h[0] >> (8 * i));
}

/* A raw line of the sender's plain shape (sender._id_lines): `{` first, `}` right before its
 * newline, no CR, no backslash, no "eventId" (so no eventId member can hide in it). */
static int plain_raw(const char *t, Py_ssize_t n)
{
    static const char eid[] = "\"eventId\"";
    if (n < 3 || t[0] != '{' || t[n - 1] != '\n' || t[n - 2] != '}')
        return 0;
    if (memchr(t, '\r', n) != NULL || memchr(t, '\\', n) != NULL || memchr(t, '\n', n - 1) != NULL)
        return 0;
    return memmem(t, n, eid, sizeof eid - 1) == NULL;
}

/* id_lines(segment, lineno, chain, member) -> (ided, chain, before), or None unless every line of
 * `segment` (raw, from a file, none its first line) is of the plain shape: sender._id_lines.
 * Each line gets its id appended (the bare line without its `}`, member, then b"%d:%s\"}" of the
 * line number and the chain's hex), its chain being blake2b(chain + bare line, digest_size=8)
 * (identity.chain_next). */
static PyObject *id_lines(PyObject *self, PyObject *args)
{
    PyObject *lines;
    long long lineno;
    const char *chain0, *member;
    Py_ssize_t chain_n, member_n;
    if (!PyArg_ParseTuple(args, "O!Ly#y#:id_lines", &PyList_Type, &lines, &lineno, &chain0, &chain_n, &member,
                          &member_n))
        return NULL;
    if (chain_n != 8) {
        PyErr_SetString(PyExc_ValueError, "a chain value is 8 bytes");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(lines);
    for (Py_ssize_t i = 0; i < count; i++) { /* all or nothing: decided before any id is made */
        PyObject *line = PyList_GET_ITEM(lines, i);
        if (!PyBytes_Check(line))
            Py_RETURN_NONE;
        if (!plain_raw(PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line)))
            Py_RETURN_NONE;
    }
    if (count == 0)
        Py_RETURN_NONE;
    static const char hex[] = "0123456789abcdef";
    unsigned char chain[8], before[8];
    memcpy(chain, chain0, 8);
    memcpy(before, chain0, 8);
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(line);
        Py_ssize_t n = PyBytes_GET_SIZE(line) - 1; /* the bare line: without its newline */
        memcpy(before, chain, 8);
        chain_next(before, text, n, chain);
        lineno++;
        char tail[64];
        int t = snprintf(tail, sizeof tail, "%lld:", lineno);
        for (int j = 0; j < 8; j++) {
            tail[t++] = hex[chain[j] >> 4];
            tail[t++] = hex[chain[j] & 15];
        }
        tail[t++] = '"';
        tail[t++] = '}';
        PyObject *ided = PyBytes_FromStringAndSize(NULL, n - 1 + member_n + t);
        if (ided == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        char *w = PyBytes_AS_STRING(ided);
        memcpy(w, text, n - 1); /* without its `}` */
        memcpy(w + n - 1, member, member_n);
        memcpy(w + n - 1 + member_n, tail, t);
        PyList_SET_ITEM(out, i, ided);
    }
    return Py_BuildValue("(Ny#y#)", out, (const char *)chain, (Py_ssize_t)8, (const char *)before, (Py_ssize_t)8);
}

/* -- the receiver's whole-body check (intake.Intake._bulk) ---------------------------------------- */

/* plain_body(body, max_line) -> (lines, with_ids) or None: whether every line of `body` (which
 * ends with a newline) is the sender's shape as _bulk takes it: read_line's shape with the
 * members userId, name, value and eventId only (no time: each line gets the receive stamp),
 * lines of at most max_line bytes, an eventId of 1 to MAX_EVENT_ID characters not starting with
 * the receiver's `~`, and either every line with an eventId or none. None sends the body to the
 * per-line path, which decides every body the same way (it accepts a superset). */
static PyObject *plain_body(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t max_line;
    if (!PyArg_ParseTuple(args, "y*n:plain_body", &buf, &max_line))
        return NULL;
    const char *p = buf.buf, *end = p + buf.len;
    Py_ssize_t lines = 0;
    int ids = -1; /* unknown until the first line */
    int plain = buf.len > 0 && end[-1] == '\n';
    while (plain && p < end) {
        const char *nl = memchr(p, '\n', end - p);
        line_t L;
        if (nl - p > max_line || !read_line(p, nl, &L, K_USER | K_NAME | K_VALUE | K_EID)) {
            plain = 0;
            break;
        }
        int has = (L.has & K_EID) != 0;
        if (has && (L.eid.n < 1 || L.eid.n > MAX_EVENT_ID || L.eid.p[0] == '~'))
            plain = 0;
        if (ids >= 0 && has != ids)
            plain = 0;
        ids = has;
        lines++;
        p = nl + 1;
    }
    PyBuffer_Release(&buf);
    if (!plain)
        Py_RETURN_NONE;
    return Py_BuildValue("(nO)", lines, ids ? Py_True : Py_False);
}

static PyObject *configure(PyObject *self, PyObject *args)
{
    PyObject *a[5];
    if (!PyArg_ParseTuple(args, "OO!OOO:configure", &a[0], &PyDict_Type, &a[1], &a[2], &a[3], &a[4]))
        return NULL;
    PyObject **slots[5] = {&SourcePart, &stamp_minutes, &stamp_minute, &event_digest, &content_digest};
    for (int i = 0; i < 5; i++) {
        Py_INCREF(a[i]);
        Py_XSETREF(*slots[i], a[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sum_lines", sum_lines, METH_VARARGS,
     "sum_lines(data, pos, offset, index, fresh, sources, opaque[, rows, part_offset]) -> (pos, index): "
     "sum the lines this loop takes from byte pos; stop at the first it does not."},
    {"id_lines", id_lines, METH_VARARGS,
     "id_lines(segment, lineno, chain, member) -> (ided, chain, before) or None: the sender's ids."},
    {"plain_body", plain_body, METH_VARARGS,
     "plain_body(body, max_line) -> (lines, with_ids) or None: the receiver's whole-body check."},
    {"sort_digest_rows", sort_digest_rows, METH_VARARGS,
     "sort_digest_rows(rows) -> bool: sort DIGEST_ROW rows by digest in place; whether one repeats."},
    {"claim_rows", claim_rows, METH_VARARGS,
     "claim_rows(parts, bases, fingerprint, first_line, at, limit, last, repeats) -> bytes: applied_events "
     "COPY rows, merged in digest order; an id's later occurrences go to repeats (REPEAT records)."},
    {"sort_repeats", sort_repeats, METH_VARARGS, "sort_repeats(repeats): REPEAT records in line order."},
    {"configure", configure, METH_VARARGS,
     "configure(SourcePart, STAMP_MINUTE, stamp_minute, event_digest, content_digest)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastlines", "The plain-shape line loop in C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastlines(void)
{
    init_hex();
    ZERO = PyLong_FromLong(0);
    EMPTY = PyUnicode_FromStringAndSize(NULL, 0);
    s_cells = PyUnicode_InternFromString("cells");
    s_in_order = PyUnicode_InternFromString("in_order");
    s_table = PyUnicode_InternFromString("table");
    if (!ZERO || !EMPTY || !s_cells || !s_in_order || !s_table || PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "Table", (PyObject *)&TableType) < 0)
        Py_CLEAR(m);
    return m;
}
