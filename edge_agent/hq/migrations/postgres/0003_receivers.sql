-- What the applier kept in one receiver's memory, in the database, so any number of receivers share it:
-- a message of a stream, the store's answer to a replay and the next birth may each reach a different one.
-- streams.gone_to: the store said it no longer holds seqs up to here (its answer to a replay);
-- streams.replay_asked_at: when a receiver last asked for a replay of this stream (one asks, not all);
-- streams.rewinding: a rewind was counted and is not over (one count per episode, whoever sees it);
ALTER TABLE streams ADD COLUMN gone_to BIGINT NOT NULL DEFAULT 0;
ALTER TABLE streams ADD COLUMN replay_asked_at DOUBLE PRECISION;
ALTER TABLE streams ADD COLUMN rewinding BIGINT NOT NULL DEFAULT 0;
-- status.births: the store's last live births [[at, boot_id], ...] (a cloned box shows as X, Y, X);
-- status.clone_alerted_at / clone_suspect: the duplicate-identity alert and the resync once it is over;
ALTER TABLE status ADD COLUMN births TEXT COLLATE "C" NOT NULL DEFAULT '[]';
ALTER TABLE status ADD COLUMN clone_alerted_at DOUBLE PRECISION;
ALTER TABLE status ADD COLUMN clone_suspect BIGINT NOT NULL DEFAULT 0;
-- commands_out.sent_at: when an unanswered command was last published (republished by one receiver).
ALTER TABLE commands_out ADD COLUMN sent_at DOUBLE PRECISION;
UPDATE commands_out SET sent_at = issued_at;
