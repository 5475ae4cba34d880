#!/usr/bin/env bash
# The spec's curl examples (translation-persistence-api.md v1.0, §3 to §7), copied as it prints
# them, in its order. tests/test_package.py runs them against the installed persistd with
# no config at all; PERSISTD_URL replaces http://localhost:8001.
set -euo pipefail
curl() { command curl --fail-with-body --silent --show-error "${@//http:\/\/localhost:8001/$PERSISTD_URL}"; echo; }

curl -X POST http://localhost:8001/api/v1/translation/sessions/batch \
  -H "Content-Type: application/json" \
  -d '{
    "sessions": [{
      "session_id": "550e8400-e29b-41d4-a716-446655440000",
      "filename": "test.xlsx",
      "file_path": "/uploads/test.xlsx",
      "status": "processing",
      "llm_provider": "openai",
      "total_tasks": 100
    }]
  }'

curl -X POST http://localhost:8001/api/v1/translation/tasks/batch \
  -H "Content-Type: application/json" \
  -d '{
    "tasks": [{
      "task_id": "task_001",
      "session_id": "550e8400-e29b-41d4-a716-446655440000",
      "batch_id": "batch_001",
      "sheet_name": "Dialogue",
      "row_index": 10,
      "column_name": "Text",
      "source_text": "Hello",
      "status": "pending"
    }]
  }'

curl -X POST http://localhost:8001/api/v1/translation/flush

curl "http://localhost:8001/api/v1/translation/sessions?status=processing&page=1&page_size=20"

curl http://localhost:8001/api/v1/translation/sessions/550e8400-e29b-41d4-a716-446655440000

curl "http://localhost:8001/api/v1/translation/sessions/550e8400-e29b-41d4-a716-446655440000/tasks?status=failed"

curl http://localhost:8001/api/v1/translation/tasks/task_001

curl http://localhost:8001/api/v1/translation/recovery/incomplete-sessions

curl -X POST http://localhost:8001/api/v1/translation/recovery/restore/550e8400-e29b-41d4-a716-446655440000

curl -X DELETE http://localhost:8001/api/v1/translation/sessions/550e8400-e29b-41d4-a716-446655440000

# 模拟清理（查看会删除多少）
curl -X POST http://localhost:8001/api/v1/translation/sessions/cleanup \
  -H "Content-Type: application/json" \
  -d '{"dry_run": true}'

# 实际清理
curl -X POST http://localhost:8001/api/v1/translation/sessions/cleanup \
  -H "Content-Type: application/json" \
  -d '{"completed_days": 90, "failed_days": 30, "dry_run": false}'

curl http://localhost:8001/api/v1/translation/stats

curl http://localhost:8001/health
