-- persistd schema for SQLite: the same tables, columns and indexes as mysql.sql (spec §8.1),
-- applied by the daemon at start when the tables are missing. What differs, and why:
--
-- * Times are INTEGER seconds since 1970 in UTC (MySQL's TIMESTAMP, whole seconds): they
--   compare and sort as numbers, and an hour is `created_at / 3600 * 3600`.
-- * Text columns are TEXT with SQLite's default BINARY collation: ids compare case- and
--   space-sensitively, as utf8mb4_bin does in MySQL. Lengths are checked at the door, the
--   same limits as MySQL's, so a row accepted by one backend is accepted by the other.
-- * game_info and metadata hold JSON text; confidence is REAL (rounded to four decimals at
--   the door, as DECIMAL(5,4) would).
-- * task_counts is kept exact by triggers, whoever writes the tasks; in MySQL persistd
--   keeps it in the transaction that writes them, each instance in rows of its own (shard).
-- * The *_version columns are MySQL's BIGINT UNSIGNED as INTEGER (a version fits 63 bits
--   until 2091: see persistd.daemon.INSTANCE_BITS).

CREATE TABLE IF NOT EXISTS translation_sessions (
    session_id TEXT NOT NULL PRIMARY KEY,
    filename TEXT NOT NULL,
    file_path TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    game_info TEXT,
    llm_provider TEXT NOT NULL,
    metadata TEXT,
    total_tasks INTEGER DEFAULT 0,
    completed_tasks INTEGER DEFAULT 0,
    failed_tasks INTEGER DEFAULT 0,
    processing_tasks INTEGER DEFAULT 0,
    created_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
    updated_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
    row_version INTEGER NOT NULL DEFAULT 0,
    game_info_version INTEGER NOT NULL DEFAULT 0,
    metadata_version INTEGER NOT NULL DEFAULT 0,
    total_tasks_version INTEGER NOT NULL DEFAULT 0,
    completed_tasks_version INTEGER NOT NULL DEFAULT 0,
    failed_tasks_version INTEGER NOT NULL DEFAULT 0,
    processing_tasks_version INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_sessions_status_created ON translation_sessions (status, created_at);
-- created_at too: the stats' average session time reads this index alone (issue 11's read bench)
CREATE INDEX IF NOT EXISTS idx_sessions_status_updated ON translation_sessions (status, updated_at, created_at);
CREATE INDEX IF NOT EXISTS idx_sessions_created_at ON translation_sessions (created_at);
CREATE INDEX IF NOT EXISTS idx_sessions_updated_at ON translation_sessions (updated_at);

CREATE TABLE IF NOT EXISTS translation_tasks (
    task_id TEXT NOT NULL PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES translation_sessions (session_id) ON DELETE CASCADE,
    batch_id TEXT NOT NULL,
    sheet_name TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    column_name TEXT NOT NULL,
    source_text TEXT NOT NULL,
    target_text TEXT,
    context TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    confidence REAL,
    error_message TEXT,
    retry_count INTEGER DEFAULT 0,
    start_time INTEGER,
    end_time INTEGER,
    duration_ms INTEGER,
    created_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
    updated_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
    row_version INTEGER NOT NULL DEFAULT 0,
    target_text_version INTEGER NOT NULL DEFAULT 0,
    context_version INTEGER NOT NULL DEFAULT 0,
    confidence_version INTEGER NOT NULL DEFAULT 0,
    error_message_version INTEGER NOT NULL DEFAULT 0,
    retry_count_version INTEGER NOT NULL DEFAULT 0,
    start_time_version INTEGER NOT NULL DEFAULT 0,
    end_time_version INTEGER NOT NULL DEFAULT 0,
    duration_ms_version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_tasks_batch_id ON translation_tasks (batch_id);
CREATE INDEX IF NOT EXISTS idx_tasks_created_at ON translation_tasks (created_at, task_id);
CREATE INDEX IF NOT EXISTS idx_tasks_status_created ON translation_tasks (status, created_at, task_id);
CREATE INDEX IF NOT EXISTS idx_tasks_session_created ON translation_tasks (session_id, created_at, task_id);
CREATE INDEX IF NOT EXISTS idx_tasks_session_status_created ON translation_tasks (session_id, status, created_at, task_id);
CREATE INDEX IF NOT EXISTS idx_tasks_session_sheet ON translation_tasks (session_id, sheet_name, row_index, column_name, task_id);
CREATE INDEX IF NOT EXISTS idx_tasks_session_status_sheet
    ON translation_tasks (session_id, status, sheet_name, row_index, column_name, task_id);

CREATE TABLE IF NOT EXISTS task_counts (
    session_id TEXT NOT NULL REFERENCES translation_sessions (session_id) ON DELETE CASCADE,
    status TEXT NOT NULL,
    created_hour INTEGER NOT NULL,
    tasks INTEGER NOT NULL,
    duration_ms_sum INTEGER NOT NULL,
    durations INTEGER NOT NULL,
    PRIMARY KEY (session_id, status, created_hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_counts_status_hour ON task_counts (status, created_hour, tasks, duration_ms_sum, durations);
CREATE INDEX IF NOT EXISTS idx_counts_hour ON task_counts (created_hour, tasks);

CREATE TRIGGER IF NOT EXISTS task_counted_in AFTER INSERT ON translation_tasks BEGIN
    INSERT INTO task_counts VALUES (NEW.session_id, NEW.status, NEW.created_at / 3600 * 3600, 1,
                                    COALESCE(NEW.duration_ms, 0), NEW.duration_ms IS NOT NULL)
    ON CONFLICT DO UPDATE SET tasks = tasks + 1, duration_ms_sum = duration_ms_sum + excluded.duration_ms_sum,
                              durations = durations + excluded.durations;
END;
CREATE TRIGGER IF NOT EXISTS task_counted_out AFTER DELETE ON translation_tasks BEGIN
    UPDATE task_counts SET tasks = tasks - 1, duration_ms_sum = duration_ms_sum - COALESCE(OLD.duration_ms, 0),
                           durations = durations - (OLD.duration_ms IS NOT NULL)
    WHERE session_id = OLD.session_id AND status = OLD.status AND created_hour = OLD.created_at / 3600 * 3600;
END;
CREATE TRIGGER IF NOT EXISTS task_counted_again
    AFTER UPDATE OF session_id, status, created_at, duration_ms ON translation_tasks BEGIN
    UPDATE task_counts SET tasks = tasks - 1, duration_ms_sum = duration_ms_sum - COALESCE(OLD.duration_ms, 0),
                           durations = durations - (OLD.duration_ms IS NOT NULL)
    WHERE session_id = OLD.session_id AND status = OLD.status AND created_hour = OLD.created_at / 3600 * 3600;
    INSERT INTO task_counts VALUES (NEW.session_id, NEW.status, NEW.created_at / 3600 * 3600, 1,
                                    COALESCE(NEW.duration_ms, 0), NEW.duration_ms IS NOT NULL)
    ON CONFLICT DO UPDATE SET tasks = tasks + 1, duration_ms_sum = duration_ms_sum + excluded.duration_ms_sum,
                              durations = durations + excluded.durations;
END;
