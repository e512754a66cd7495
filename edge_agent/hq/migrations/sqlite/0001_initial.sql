-- Version 1: HQ's tables as the releases before versioned migrations made them. IF NOT EXISTS, so
-- that such a database is adopted as it stands (SqliteStore adds the columns those releases added in place).
CREATE TABLE IF NOT EXISTS streams(
  store TEXT NOT NULL, stream TEXT NOT NULL,
  last_seq INTEGER NOT NULL DEFAULT 0,
  applied INTEGER NOT NULL DEFAULT 0,
  facts INTEGER NOT NULL DEFAULT 0,
  historical INTEGER NOT NULL DEFAULT 0,
  duplicates INTEGER NOT NULL DEFAULT 0,
  gaps INTEGER NOT NULL DEFAULT 0,
  lost INTEGER NOT NULL DEFAULT 0,
  last_ts REAL, last_sent REAL, last_applied_at REAL,
  last_id TEXT NOT NULL DEFAULT '',
  hwm INTEGER NOT NULL DEFAULT 0,
  rewinds INTEGER NOT NULL DEFAULT 0,
  replays INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(store, stream)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commands_out(
  store TEXT NOT NULL, cmd_id TEXT NOT NULL, payload BLOB NOT NULL, issued_at REAL NOT NULL, answered_at REAL,
  PRIMARY KEY(store, cmd_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_unanswered ON commands_out(answered_at) WHERE answered_at IS NULL;
CREATE TABLE IF NOT EXISTS inv_journal(
  store TEXT NOT NULL, seq INTEGER NOT NULL, sums TEXT NOT NULL, id TEXT NOT NULL DEFAULT '',
  PRIMARY KEY(store, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, store TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inventory(
  store TEXT NOT NULL, zone TEXT NOT NULL, gtin TEXT NOT NULL, qty INTEGER NOT NULL,
  PRIMARY KEY(store, zone, gtin)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stash(
  store TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL,
  PRIMARY KEY(store, stream, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshot_parts(
  store TEXT NOT NULL, snapshot_id TEXT NOT NULL, part INTEGER NOT NULL, parts INTEGER NOT NULL,
  as_of_seq INTEGER NOT NULL, items TEXT NOT NULL, as_of_id TEXT NOT NULL DEFAULT '',
  PRIMARY KEY(store, snapshot_id, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(
  store TEXT NOT NULL, snapshot_id TEXT NOT NULL, as_of_seq INTEGER NOT NULL, applied_at REAL NOT NULL,
  outcome TEXT NOT NULL, mismatches INTEGER NOT NULL, PRIMARY KEY(store, snapshot_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages(
  store TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
  historical INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY(store, stream, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS status(
  store TEXT PRIMARY KEY, state TEXT NOT NULL, boot_id TEXT, connection INTEGER, at REAL NOT NULL,
  instance TEXT NOT NULL DEFAULT '', identity_conflicts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS resyncs(
  store TEXT NOT NULL, cmd_id TEXT NOT NULL, requested_at REAL NOT NULL, done_at REAL,
  PRIMARY KEY(store, cmd_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS floors(
  store TEXT NOT NULL, stream TEXT NOT NULL, floor INTEGER NOT NULL, PRIMARY KEY(store, stream)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labels(
  store TEXT NOT NULL, label TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL,
  PRIMARY KEY(store, label)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB);
