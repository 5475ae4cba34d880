-- persistd schema: spec §8.1, applied by the daemon at start when the tables are missing.
--
-- One deliberate difference from the spec: the key columns (session_id, task_id) use the
-- binary collation utf8mb4_bin. Under the default case-insensitive collation "Task_1" and
-- "task_1" are one row in MySQL but two in persistd's buffer, and last-write-wins could not
-- hold. persistd refuses ids containing whitespace, so PAD SPACE cannot merge ids either.
--
-- The indexes extend the spec's: each of its idx_status, idx_session_id and
-- idx_session_status is the prefix of a longer index below that also serves a list's order
-- (issue 3). An index changed here reaches an existing database only by hand: the daemon
-- creates missing tables, and adds the columns below that persistd 1.0 did not have
-- (persistd.mysql.MIGRATIONS), nothing else.
--
-- The *_version columns hold last-write-wins in the database (persistd.storage.version_columns):
-- row_version is the latest write's, <field>_version the latest write's that carried <field>.

CREATE TABLE IF NOT EXISTS translation_sessions (
    session_id VARCHAR(36) COLLATE utf8mb4_bin PRIMARY KEY COMMENT '会话ID',
    filename VARCHAR(255) NOT NULL COMMENT '文件名',
    file_path VARCHAR(512) NOT NULL COMMENT '文件路径',
    status VARCHAR(20) NOT NULL DEFAULT 'pending' COMMENT '状态',
    game_info JSON COMMENT '游戏信息',
    llm_provider VARCHAR(50) NOT NULL COMMENT 'LLM提供商',
    metadata JSON COMMENT '元数据',
    total_tasks INT DEFAULT 0 COMMENT '总任务数',
    completed_tasks INT DEFAULT 0 COMMENT '完成任务数',
    failed_tasks INT DEFAULT 0 COMMENT '失败任务数',
    processing_tasks INT DEFAULT 0 COMMENT '处理中任务数',
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP COMMENT '创建时间',
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP COMMENT '更新时间',
    row_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    game_info_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    metadata_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    total_tasks_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    completed_tasks_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    failed_tasks_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    processing_tasks_version BIGINT UNSIGNED NOT NULL DEFAULT 0,

    INDEX idx_status_created (status, created_at),
    INDEX idx_status_updated (status, updated_at),
    INDEX idx_created_at (created_at),
    INDEX idx_updated_at (updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS translation_tasks (
    task_id VARCHAR(64) COLLATE utf8mb4_bin PRIMARY KEY COMMENT '任务ID',
    session_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL COMMENT '会话ID',
    batch_id VARCHAR(64) NOT NULL COMMENT '批次ID',
    sheet_name VARCHAR(255) NOT NULL COMMENT '工作表名',
    row_index INT NOT NULL COMMENT '行索引',
    column_name VARCHAR(255) NOT NULL COMMENT '列名',
    source_text TEXT NOT NULL COMMENT '源文本',
    target_text TEXT COMMENT '翻译结果',
    context TEXT COMMENT '上下文',
    status VARCHAR(20) NOT NULL DEFAULT 'pending' COMMENT '状态',
    confidence DECIMAL(5,4) COMMENT '置信度',
    error_message TEXT COMMENT '错误信息',
    retry_count INT DEFAULT 0 COMMENT '重试次数',
    start_time TIMESTAMP NULL COMMENT '开始时间',
    end_time TIMESTAMP NULL COMMENT '结束时间',
    duration_ms INT COMMENT '耗时（毫秒）',
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP COMMENT '创建时间',
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP COMMENT '更新时间',
    row_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    target_text_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    context_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    confidence_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    error_message_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    retry_count_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    start_time_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    end_time_version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    duration_ms_version BIGINT UNSIGNED NOT NULL DEFAULT 0,

    FOREIGN KEY (session_id) REFERENCES translation_sessions(session_id) ON DELETE CASCADE,
    INDEX idx_batch_id (batch_id),
    -- Every list is read in the order of an index (the primary key task_id is the last
    -- column of each), so a page costs its offset in index entries, never a sort.
    INDEX idx_created_at (created_at),                                          -- GET /tasks
    INDEX idx_status_created (status, created_at),                              -- GET /tasks?status
    INDEX idx_session_created (session_id, created_at),                         -- GET /tasks?session_id
    INDEX idx_session_status_created (session_id, status, created_at),          -- GET /tasks?session_id&status
    INDEX idx_session_sheet (session_id, sheet_name, row_index, column_name),   -- GET /sessions/{id}/tasks
    INDEX idx_session_status_sheet (session_id, status, sheet_name, row_index, column_name)  -- ?status, restore
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The tasks counted by session, status and hour of creation, kept exact by persistd in the
-- transaction that writes or deletes the tasks (issue 3): a list's `total` and the stats sum
-- these rows instead of counting a million tasks. A start that finds it empty while tasks
-- exist counts them: after tasks were written by other means, empty it and restart persistd.
-- Each instance changes only the rows of its own `shard` (its instance id), so that instances
-- flushing the same sessions at once do not conflict (on Galera: abort each other); a bucket is
-- the sum of its shards' rows, and one row alone may be negative (tasks counted in by one
-- instance and out by another).
CREATE TABLE IF NOT EXISTS task_counts (
    session_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
    status VARCHAR(20) NOT NULL,
    created_hour TIMESTAMP NOT NULL,
    tasks INT NOT NULL,
    duration_ms_sum BIGINT NOT NULL,  -- of the tasks with a duration_ms
    durations INT NOT NULL,           -- how many tasks have a duration_ms
    shard SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, status, created_hour, shard),                      -- ?session_id
    FOREIGN KEY (session_id) REFERENCES translation_sessions(session_id) ON DELETE CASCADE,
    INDEX idx_status_hour (status, created_hour, tasks, duration_ms_sum, durations),  -- ?status, stats
    INDEX idx_hour (created_hour, tasks)                                        -- no filter, dates only
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
