-- Who sent which command to which store, and what the store answered (hq/api.py, POST /cmd and /prices).
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, who TEXT NOT NULL, request TEXT NOT NULL, store TEXT NOT NULL,
  cmd_id TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL, result TEXT, result_at REAL,
  UNIQUE(store, cmd_id));
CREATE INDEX IF NOT EXISTS audit_request ON audit(request);
