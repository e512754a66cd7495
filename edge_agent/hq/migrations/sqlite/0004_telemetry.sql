-- Version 3: telemetry with retention, as postgres/0003_telemetry.sql has it, but SQLite has no
-- partitions: one table with an index on `day`, and retention is a DELETE of the days past
-- hq.retention_days (HqStore.expire). HqStore._move_telemetry moves the rows `messages` has of those streams.
CREATE TABLE IF NOT EXISTS telemetry(
  store TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, day INTEGER NOT NULL,
  ts REAL NOT NULL, historical INTEGER NOT NULL, body TEXT NOT NULL,
  PRIMARY KEY(store, stream, seq, day)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS telemetry_day ON telemetry(day);
CREATE TABLE IF NOT EXISTS telemetry_hourly(
  store TEXT NOT NULL, stream TEXT NOT NULL, hour INTEGER NOT NULL,
  messages INTEGER NOT NULL, items INTEGER NOT NULL, bytes INTEGER NOT NULL, rehomed INTEGER NOT NULL,
  max_backlog INTEGER NOT NULL, PRIMARY KEY(store, stream, hour)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS telemetry_hourly_hour ON telemetry_hourly(hour);
CREATE TABLE IF NOT EXISTS traffic_hourly(
  store TEXT NOT NULL, camera TEXT NOT NULL, hour INTEGER NOT NULL,
  entries INTEGER NOT NULL, exits INTEGER NOT NULL, visits INTEGER NOT NULL, person_s REAL NOT NULL,
  PRIMARY KEY(store, camera, hour)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS traffic_hourly_hour ON traffic_hourly(hour);
