-- What the applier kept in one receiver's memory, in the database, so any number of receivers share it
-- (postgres/0003_receivers.sql says why each column is here).
ALTER TABLE streams ADD COLUMN gone_to INTEGER NOT NULL DEFAULT 0;
ALTER TABLE streams ADD COLUMN replay_asked_at REAL;
ALTER TABLE streams ADD COLUMN rewinding INTEGER NOT NULL DEFAULT 0;
ALTER TABLE status ADD COLUMN births TEXT NOT NULL DEFAULT '[]';
ALTER TABLE status ADD COLUMN clone_alerted_at REAL;
ALTER TABLE status ADD COLUMN clone_suspect INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commands_out ADD COLUMN sent_at REAL;
UPDATE commands_out SET sent_at = issued_at;
