-- `evtool rejects --reapply`: a rejected line that became valid is applied once and marked here
-- (kept, not deleted, so the audit trail shows what was rejected, why, and when it was re-applied).
ALTER TABLE rejected_lines
    ADD COLUMN reapplied_at timestamptz,
    ADD COLUMN reapply_outcome text CHECK (reapply_outcome IN ('applied', 'duplicate'));
