-- Version 3: telemetry with retention. traffic/stats, traffic/heatmap, health and esl/state leave `messages`
-- (which kept every body for ever) for `telemetry`, partitioned by `day`: the UTC day of the message's own
-- ts, in days since 1970-01-01. HqStore makes the day partitions (telemetry_dYYYYMMDD: today to today+2
-- ahead, and on demand for a late message) and drops them whole past
-- hq.retention_days: DROP TABLE, no DELETE to vacuum. The primary key holds the partition key, as
-- PostgreSQL requires. HqStore._move_telemetry moves the rows `messages` has of those streams (per day: Python).
-- `messages` keeps the streams that are a record: epcis/events, cmd-result, esl/alert, inventory/count.
CREATE TABLE telemetry(
  store TEXT COLLATE "C" NOT NULL, stream TEXT COLLATE "C" NOT NULL, seq BIGINT NOT NULL, day INTEGER NOT NULL,
  ts DOUBLE PRECISION NOT NULL, historical BIGINT NOT NULL, body TEXT COLLATE "C" NOT NULL,
  PRIMARY KEY(store, stream, seq, day)) PARTITION BY RANGE (day);
-- Hourly roll-ups, written in the transaction that applies each message and kept for
-- hq.rollup_retention_days. `hour` is epoch seconds at the start of the UTC hour. Per stream, by the hour of
-- the message's ts: messages, items (1 for a body without items), body bytes, how many were kept in HQ's
-- today as their own day is not kept (telemetry.py), and the largest backlog (pending facts) health reported.
CREATE TABLE telemetry_hourly(
  store TEXT COLLATE "C" NOT NULL, stream TEXT COLLATE "C" NOT NULL, hour BIGINT NOT NULL,
  messages BIGINT NOT NULL, items BIGINT NOT NULL, bytes BIGINT NOT NULL, rehomed BIGINT NOT NULL,
  max_backlog BIGINT NOT NULL, PRIMARY KEY(store, stream, hour));
CREATE INDEX telemetry_hourly_hour ON telemetry_hourly(hour);
-- Per camera ("*": store-wide), by the hour its bucket starts in: entries, exits and visits of the
-- traffic/stats items with no zone, person-seconds of the traffic/heatmap items (their cells summed).
CREATE TABLE traffic_hourly(
  store TEXT COLLATE "C" NOT NULL, camera TEXT COLLATE "C" NOT NULL, hour BIGINT NOT NULL,
  entries BIGINT NOT NULL, exits BIGINT NOT NULL, visits BIGINT NOT NULL, person_s DOUBLE PRECISION NOT NULL,
  PRIMARY KEY(store, camera, hour));
CREATE INDEX traffic_hourly_hour ON traffic_hourly(hour);
