/* The processor's per-line loop for the plain shape, in C (issue 11): what parser._sum_plain does
 * for a line, without the interpreter's cost per line.
 *
 * sum_lines(data, pos, offset, index, fresh, sources, opaque) sums the lines of `data` from byte
 * `pos` into a ParsedPart's `fresh`, `sources` and `opaque`, exactly as parser._sum_plain would,
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
 *   events.MAX_EVENT_ID characters (an opaque id: its digests come from identity's functions).
 *
 * Anything else (a decimal or string value, escapes, other members, a bad stamp...) stops it.
 * The sender cells follow parser._SenderCells.add step for step; the sums parser.add.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_USER_ID 256
#define MAX_EVENT_ID 128
#define CELL_LINES 1024
#define ENTRY 10
#define MAX_DIGITS 18

/* Set once by configure(): the Python side of the contract. */
static PyObject *SourcePart, *stamp_minutes, *stamp_minute, *money_add, *event_digest, *content_digest;
static PyObject *ZERO, *ONE, *EMPTY, *s_cells, *s_in_order, *s_sums;

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
 * closing quote, or NULL. */
static inline const char *string_at(const char *p, const char *e, span *out)
{
    if (p >= e || *p != '"')
        return NULL;
    const char *s = ++p;
    for (; p < e; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            out->p = s;
            out->n = p - s;
            return p + 1;
        }
        if (c < 0x20 || c > 0x7e || c == '\\')
            return NULL;
    }
    return NULL;
}

static inline int is_digit(char c) { return c >= '0' && c <= '9'; }
static inline int is_hex(char c) { return is_digit(c) || (c >= 'a' && c <= 'f'); }
static inline int hex_value(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

static int span_is(span s, const char *lit)
{
    size_t n = strlen(lit);
    return (size_t)s.n == n && memcmp(s.p, lit, n) == 0;
}

/* The line [p, nl) (nl at its newline) read into L; 0 when this loop does not take it. */
static int read_line(const char *p, const char *nl, line_t *L)
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
        if (span_is(k, "userId"))
            bit = K_USER;
        else if (span_is(k, "name"))
            bit = K_NAME;
        else if (span_is(k, "value"))
            bit = K_VALUE;
        else if (span_is(k, "eventId"))
            bit = K_EID;
        else if (span_is(k, "timestamp"))
            bit = K_TS;
        else
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

/* identity.SOURCE_ID.fullmatch: ([0-9a-f]{16}):([1-9][0-9]{0,17})(?::([0-9a-f]{16}))? */
static int sender_id(span e, long long *number, const char **chain)
{
    Py_ssize_t i;
    long long v = 0;
    if (e.n < 18)
        return 0;
    for (i = 0; i < 16; i++)
        if (!is_hex(e.p[i]))
            return 0;
    if (e.p[16] != ':' || e.p[17] < '1' || e.p[17] > '9')
        return 0;
    for (i = 17; i < e.n && is_digit(e.p[i]); i++) {
        if (i - 17 == MAX_DIGITS)
            return 0;
        v = v * 10 + (e.p[i] - '0');
    }
    *number = v;
    if (i == e.n) {
        *chain = NULL;
        return 1;
    }
    if (e.p[i] != ':' || e.n - i - 1 != 16)
        return 0;
    for (Py_ssize_t j = i + 1; j < e.n; j++)
        if (!is_hex(e.p[j]))
            return 0;
    *chain = e.p + i + 1;
    return 1;
}

/* parser.add: count one event into `sums` (money_add unless both are ints). */
static int add(PyObject *sums, PyObject *key, int is_add, PyObject *value)
{
    PyObject *s = PyDict_GetItemWithError(sums, key);
    if (s == NULL) {
        if (PyErr_Occurred())
            return -1;
        s = PyList_New(4);
        if (s == NULL)
            return -1;
        PyObject *items[4] = {ONE, value, ZERO, ZERO};
        if (!is_add) {
            items[0] = ZERO, items[1] = ZERO, items[2] = ONE, items[3] = value;
        }
        for (int i = 0; i < 4; i++) {
            Py_INCREF(items[i]);
            PyList_SET_ITEM(s, i, items[i]);
        }
        int r = PyDict_SetItem(sums, key, s);
        Py_DECREF(s);
        return r;
    }
    if (!PyList_CheckExact(s) || PyList_GET_SIZE(s) != 4) {
        PyErr_SetString(PyExc_TypeError, "sums hold lists of four");
        return -1;
    }
    int i = is_add ? 0 : 2;
    PyObject *n = PyNumber_Add(PyList_GET_ITEM(s, i), ONE);
    if (n == NULL)
        return -1;
    PyList_SetItem(s, i, n);
    PyObject *m = PyList_GET_ITEM(s, i + 1);
    PyObject *total = PyLong_CheckExact(m) && PyLong_CheckExact(value)
                          ? PyNumber_Add(m, value)
                          : PyObject_CallFunctionObjArgs(money_add, m, value, NULL);
    if (total == NULL)
        return -1;
    PyList_SetItem(s, i + 1, total);
    return 0;
}

/* parser._SenderCells, for the span of one call. */
typedef struct {
    char source[16];
    int have;
    PyObject *part, *cells, *in_order, *sums; /* owned */
    long long n;
    PyObject *cell; /* owned */
} senders_t;

static void senders_clear(senders_t *S)
{
    Py_CLEAR(S->part);
    Py_CLEAR(S->cells);
    Py_CLEAR(S->in_order);
    Py_CLEAR(S->sums);
    Py_CLEAR(S->cell);
}

static inline long long cell_of(long long n) { return n < 0 ? -1 : n / CELL_LINES; }

/* _SenderCells.add: file the entry of line `number` (chain: 16 hex digits or NULL) of `source`;
 * its source's sums (borrowed from S), or NULL on an error. */
static PyObject *sender_add(senders_t *S, PyObject *sources, const char *source, long long number,
                            const char *chain)
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
        S->sums = PyObject_GetAttr(part, s_sums);
        if (S->cells == NULL || S->in_order == NULL || S->sums == NULL)
            return NULL;
        if (!PyDict_Check(S->cells) || !PySet_Check(S->in_order)) {
            PyErr_SetString(PyExc_TypeError, "a SourcePart's cells is a dict, its in_order a set");
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
    for (int i = 0; i < 8; i++)
        e[2 + i] = chain ? (unsigned char)(hex_value(chain[2 * i]) << 4 | hex_value(chain[2 * i + 1])) : 0;
    return S->sums;
}

static PyObject *sum_lines(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t pos, offset, index;
    PyObject *fresh, *sources, *opaque;
    if (!PyArg_ParseTuple(args, "y*nnnO!O!O!:sum_lines", &buf, &pos, &offset, &index, &PyDict_Type, &fresh,
                          &PyDict_Type, &sources, &PyList_Type, &opaque))
        return NULL;
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
        if (nl == NULL || !read_line(p, nl, &L))
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
        const char *chain = NULL;
        enum { FRESH, SENDER, OPAQUE } kind;
        if (!(L.has & K_EID))
            kind = FRESH;
        else if (sender_id(L.eid, &number, &chain))
            kind = SENDER;
        else if (L.eid.n > 0 && L.eid.n <= MAX_EVENT_ID)
            kind = L.eid.p[0] == '~' ? FRESH : OPAQUE; /* events.RECEIVER_ID_PREFIX: a receiver id */
        else {
            Py_DECREF(minute);
            break;
        }
        int is_add = L.name.n == 11; /* add_revenue (read_line checked it is one of the two) */
        PyObject *user = PyUnicode_FromStringAndSize(L.user.p, L.user.n);
        PyObject *value = PyLong_FromLongLong(L.value);
        PyObject *key = user && value ? PyTuple_Pack(2, user, minute) : NULL;
        Py_DECREF(minute);
        if (key == NULL) {
            Py_XDECREF(user);
            Py_XDECREF(value);
            failed = 1;
            break;
        }
        int r = 0;
        if (kind == OPAQUE) {
            PyObject *eid = PyUnicode_FromStringAndSize(L.eid.p, L.eid.n);
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
        } else {
            PyObject *sums = kind == FRESH ? fresh : sender_add(&S, sources, L.eid.p, number, chain);
            r = sums == NULL ? -1 : add(sums, key, is_add, value);
        }
        Py_DECREF(key);
        Py_DECREF(user);
        Py_DECREF(value);
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

static PyObject *configure(PyObject *self, PyObject *args)
{
    PyObject *a[6];
    if (!PyArg_ParseTuple(args, "OO!OOOO:configure", &a[0], &PyDict_Type, &a[1], &a[2], &a[3], &a[4], &a[5]))
        return NULL;
    PyObject **slots[6] = {&SourcePart, &stamp_minutes, &stamp_minute, &money_add, &event_digest, &content_digest};
    for (int i = 0; i < 6; i++) {
        Py_INCREF(a[i]);
        Py_XSETREF(*slots[i], a[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sum_lines", sum_lines, METH_VARARGS,
     "sum_lines(data, pos, offset, index, fresh, sources, opaque) -> (pos, index): sum the lines this "
     "loop takes from byte pos; stop at the first it does not."},
    {"configure", configure, METH_VARARGS,
     "configure(SourcePart, STAMP_MINUTE, stamp_minute, money_add, event_digest, content_digest)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastlines", "The plain-shape line loop in C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastlines(void)
{
    ZERO = PyLong_FromLong(0);
    ONE = PyLong_FromLong(1);
    EMPTY = PyUnicode_FromStringAndSize(NULL, 0);
    s_cells = PyUnicode_InternFromString("cells");
    s_in_order = PyUnicode_InternFromString("in_order");
    s_sums = PyUnicode_InternFromString("sums");
    if (!ZERO || !ONE || !EMPTY || !s_cells || !s_in_order || !s_sums)
        return NULL;
    return PyModule_Create(&module);
}
