"""Recovery: spec §5, and the spec's own Python client (§10) driven end to end.

Recovery endpoints first write out the buffer (DESIGN.md), so the daemons here flush only
every 30 s unless asked: what the answers contain was accepted, not necessarily written.
"""

import asyncio
import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Dict, List  # noqa: UP035 - the spec's client is copied as printed

import httpx
import pytest
import trio

from conftest import SESSION_ID, make_config, running, session, task

INCOMPLETE = "/api/v1/translation/recovery/incomplete-sessions"
RESTORE = "/api/v1/translation/recovery/restore"
SESSIONS_BATCH = "/api/v1/translation/sessions/batch"
TASKS_BATCH = "/api/v1/translation/tasks/batch"

# The keys of spec §5, as printed there.
INCOMPLETE_KEYS = {"count", "sessions"}
INCOMPLETE_SESSION_KEYS = {"session_id", "filename", "status", "total_tasks", "completed_tasks", "pending_tasks",
                           "failed_tasks", "created_at", "updated_at"}
RESTORED_KEYS = {"session_id", "session", "tasks_count", "tasks", "restored_at"}
RESTORED_SESSION_KEYS = {"session_id", "filename", "file_path", "status", "game_info", "llm_provider",
                         "total_tasks", "completed_tasks", "failed_tasks", "pending_tasks"}
RESTORED_TASK_KEYS = {"task_id", "batch_id", "sheet_name", "row_index", "column_name", "source_text", "status",
                      "created_at"}

UTC_TIME = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")
BASE = datetime(2025, 9, 30, 10, 0, 0)  # naive UTC


def assert_utc_time(value) -> datetime:
    assert isinstance(value, str) and UTC_TIME.match(value), value
    return datetime.fromisoformat(value)


def srow(session_id, status="processing", **fields):
    return {"session_id": session_id, "filename": f"{session_id}.xlsx", "file_path": f"/uploads/{session_id}.xlsx",
            "status": status, "llm_provider": "openai", "total_tasks": 0, "completed_tasks": 0,
            "failed_tasks": 0, "processing_tasks": 0, "created_at": BASE, "updated_at": BASE, **fields}


async def insert(db, table, rows):
    columns = list(rows[0])
    values = ",".join(["(" + ",".join(["%s"] * len(columns)) + ")"] * len(rows))
    await db.query(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}",
                   *[row[c] for row in rows for c in columns])


def sheet_key(t: dict) -> tuple:
    return (t["sheet_name"], t["row_index"], t["column_name"], t["task_id"])


# ── §5.1 incomplete sessions ─────────────────────────────────────────────────────────


async def test_incomplete_sessions_are_exactly_the_pending_and_processing_ones(slow_daemon, db):
    """§5.1 lists every pending and processing session, and no other, with its shape and
    count; rows accepted just before the call count, whether new or updates."""
    d = slow_daemon
    await insert(db, "translation_sessions", [
        srow("stored-processing", total_tasks=1000, completed_tasks=350, failed_tasks=10),
        srow("stored-pending", status="pending", total_tasks=500),
        srow("stored-completed", status="completed"),
        srow("stored-failed", status="failed"),
        srow("stored-cancelled", status="cancelled"),
        srow("finishing", status="processing"),
        srow("reopened", status="completed"),
    ])
    # accepted, not flushed: a new session, and updates that move two stored ones
    await d.post(SESSIONS_BATCH, {"sessions": [
        session("just-accepted", status="pending", total_tasks=3),
        session("finishing", status="completed"),
        session("reopened", status="processing"),
        session("new-cancelled", status="cancelled"),
    ]})
    r = await d.get(INCOMPLETE)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == INCOMPLETE_KEYS
    by_id = {s["session_id"]: s for s in body["sessions"]}
    assert set(by_id) == {"stored-processing", "stored-pending", "just-accepted", "reopened"}
    assert body["count"] == len(body["sessions"]) == 4
    for s in body["sessions"]:
        assert set(s) == INCOMPLETE_SESSION_KEYS
        assert_utc_time(s["created_at"])
        assert_utc_time(s["updated_at"])
    # the spec's example row
    assert by_id["stored-processing"] == {
        "session_id": "stored-processing", "filename": "stored-processing.xlsx", "status": "processing",
        "total_tasks": 1000, "completed_tasks": 350, "pending_tasks": 640, "failed_tasks": 10,
        "created_at": "2025-09-30T10:00:00Z", "updated_at": "2025-09-30T10:00:00Z"}
    assert (by_id["stored-pending"]["status"], by_id["stored-pending"]["pending_tasks"]) == ("pending", 500)
    assert (by_id["just-accepted"]["status"], by_id["just-accepted"]["pending_tasks"]) == ("pending", 3)
    assert by_id["reopened"]["created_at"] == "2025-09-30T10:00:00Z"  # the stored one


async def test_no_incomplete_sessions_is_an_empty_list(daemon, db):
    """With only finished sessions the answer is count 0 and an empty list."""
    await insert(db, "translation_sessions", [srow("done", status="completed")])
    r = await daemon.get(INCOMPLETE)
    assert (r.status_code, r.json()) == (200, {"count": 0, "sessions": []})


# ── §5.2 restore ─────────────────────────────────────────────────────────────────────


async def test_restore_returns_the_session_and_its_unfinished_tasks_in_sheet_order(slow_daemon, db):
    """§5.2: the session in its shape, every pending and processing task (none completed or
    failed, none of another session) in sheet order, tasks_count, and restored_at."""
    d = slow_daemon
    await d.post(SESSIONS_BATCH, {"sessions": [
        session(total_tasks=12, completed_tasks=3, failed_tasks=2, processing_tasks=2,
                game_info={"game_name": "Fantasy RPG"}, metadata={"user_id": "u1"}),
        session("other")]})
    specs = [  # task_id, sheet, row, column, status
        ("t01", "menu", 2, "Text", "pending"), ("t02", "dialogue", 10, "Text", "processing"),
        ("t03", "dialogue", 2, "Text", "pending"), ("t04", "dialogue", 2, "Note", "pending"),
        ("t05", "dialogue", 3, "Text", "completed"), ("t06", "menu", 1, "Text", "failed"),
        ("t07", "dialogue", 1, "Text", "completed"), ("t08", "items", 0, "Text", "processing"),
        ("t09", "items", 0, "Text", "failed"), ("t00", "dialogue", 2, "Note", "pending"),
    ]
    rows = [task(t, sheet_name=s, row_index=r, column_name=c, status=st, target_text=None)
            for t, s, r, c, st in specs]
    await d.post(TASKS_BATCH, {"tasks": rows + [task("o1", session_id="other")]})
    await d.flush()
    # accepted just before the call: a new pending task, and one finished
    await d.post(TASKS_BATCH, {"tasks": [task("t10", sheet_name="items", row_index=5),
                                         task("t03", sheet_name="dialogue", row_index=2, status="completed")]})
    before = datetime.now(timezone.utc).replace(microsecond=0)
    r = await d.post(f"{RESTORE}/{SESSION_ID}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == RESTORED_KEYS
    assert body["session_id"] == SESSION_ID
    assert body["session"] == {
        "session_id": SESSION_ID, "filename": "game.xlsx", "file_path": "/uploads/game.xlsx",
        "status": "processing", "game_info": {"game_name": "Fantasy RPG"}, "llm_provider": "openai",
        "total_tasks": 12, "completed_tasks": 3, "failed_tasks": 2, "pending_tasks": 5}
    assert [t["task_id"] for t in body["tasks"]] == ["t00", "t04", "t02", "t08", "t10", "t01"]
    assert body["tasks_count"] == 6
    for t in body["tasks"]:
        assert set(t) == RESTORED_TASK_KEYS
        assert t["status"] in ("pending", "processing")
        assert_utc_time(t["created_at"])
    assert body["tasks"][1] == {"task_id": "t04", "batch_id": "batch_001", "sheet_name": "dialogue", "row_index": 2,
                                "column_name": "Note", "source_text": "Hello, adventurer!", "status": "pending",
                                "created_at": body["tasks"][1]["created_at"]}
    restored_at = assert_utc_time(body["restored_at"])
    assert before - timedelta(seconds=1) <= restored_at <= datetime.now(timezone.utc) + timedelta(seconds=1)


async def test_restored_tasks_carry_every_character_and_time_as_the_task_get_shows_them(daemon, db):
    """The database writes each restored task's JSON: quotes, backslashes, NUL and other
    control characters, CJK and emoji come back as sent, in valid JSON, and created_at
    reads as GET /tasks/{id} prints it."""
    nasty = "它说：\"Hello\", 'adventurer' \\ \\\\n \0 \n\r\t \x1a \x7f \u2028 😀 🎮 é ' OR 1=1; --"
    await daemon.post(SESSIONS_BATCH, {"sessions": [session()]})
    await daemon.post(TASKS_BATCH, {"tasks": [task("t1", source_text=nasty, sheet_name=nasty[:40], column_name="\"",
                                                   batch_id="b\\1", row_index=2_147_483_647)]})
    r = await daemon.post(f"{RESTORE}/{SESSION_ID}")
    assert r.status_code == 200, r.text
    (restored,) = r.json()["tasks"]
    shown = (await daemon.get("/api/v1/translation/tasks/t1")).json()
    assert restored == {k: shown[k] for k in RESTORED_TASK_KEYS}
    assert (restored["source_text"], restored["sheet_name"], restored["column_name"], restored["batch_id"],
            restored["row_index"]) == (nasty, nasty[:40], '"', "b\\1", 2_147_483_647)


async def test_restore_of_a_session_accepted_but_not_yet_written(slow_daemon, db):
    """A session and its tasks accepted right before the call, never flushed, restore."""
    d = slow_daemon
    await d.post(SESSIONS_BATCH, {"sessions": [session(status="pending", total_tasks=3)]})
    await d.post(TASKS_BATCH, {"tasks": [task(f"t{i}", row_index=i) for i in range(3)]})
    assert await db.query("SELECT COUNT(*) FROM translation_sessions") == ((0,),)
    r = await d.post(f"{RESTORE}/{SESSION_ID}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["session"]["status"], body["session"]["pending_tasks"]) == ("pending", 3)
    assert (body["tasks_count"], [t["task_id"] for t in body["tasks"]]) == (3, ["t0", "t1", "t2"])


async def test_restore_of_an_unknown_session_is_404(daemon, db):
    """Restoring an id that was never accepted is 404 with the id in the body."""
    await insert(db, "translation_sessions", [srow(SESSION_ID)])
    r = await daemon.post(f"{RESTORE}/nope")
    assert r.status_code == 404
    assert r.json() == {"detail": "Session not found", "session_id": "nope", "error_code": "NOT_FOUND",
                        "errors": []}


async def test_a_session_of_5000_unfinished_tasks_restores_completely(daemon, db):
    """Every one of 5,000 pending and processing tasks comes back, once, in sheet order;
    the 300 finished ones do not."""
    await daemon.post(SESSIONS_BATCH, {"sessions": [session(total_tasks=5300)]})
    rows = [task(f"t{i:04}", sheet_name=f"sheet{i % 7}", row_index=i // 7, column_name="Text",
                 status=("pending", "processing")[i % 2]) for i in range(5000)]
    rows += [task(f"done{i:03}", row_index=i, status=("completed", "failed")[i % 2]) for i in range(300)]
    for i in range(0, len(rows), 1000):
        assert (await daemon.post(TASKS_BATCH, {"tasks": rows[i:i + 1000]})).status_code == 202
    r = await daemon.post(f"{RESTORE}/{SESSION_ID}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tasks_count"] == 5000
    assert [t["task_id"] for t in body["tasks"]] == [t["task_id"] for t in sorted(rows[:5000], key=sheet_key)]


# ── the spec's client, §10 ───────────────────────────────────────────────────────────
# §10.1, copied as the spec prints it (it is asyncio code: it runs in a worker thread).

logger = logging.getLogger(__name__)


class PersistenceClient:
    """持久化服务客户端"""

    def __init__(self, base_url: str = "http://localhost:8001"):
        self.base_url = base_url
        self.session_buffer = []
        self.task_buffer = []
        self.batch_size = 100

    async def persist_session(self, session: Dict):
        """持久化单个会话"""
        self.session_buffer.append(session)
        if len(self.session_buffer) >= self.batch_size:
            await self._flush_sessions()

    async def persist_tasks(self, tasks: List[Dict]):
        """持久化任务列表"""
        self.task_buffer.extend(tasks)
        if len(self.task_buffer) >= self.batch_size:
            await self._flush_tasks()

    async def _flush_sessions(self):
        """发送会话批次"""
        if not self.session_buffer:
            return

        batch = self.session_buffer[:self.batch_size]
        self.session_buffer = self.session_buffer[self.batch_size:]

        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.post(
                    f"{self.base_url}/api/v1/translation/sessions/batch",
                    json={"sessions": batch}
                )
                response.raise_for_status()
                logger.info(f"Persisted {len(batch)} sessions")
        except Exception as e:
            logger.warning(f"Failed to persist sessions: {e}")

    async def _flush_tasks(self):
        """发送任务批次"""
        if not self.task_buffer:
            return

        batch = self.task_buffer[:self.batch_size]
        self.task_buffer = self.task_buffer[self.batch_size:]

        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.post(
                    f"{self.base_url}/api/v1/translation/tasks/batch",
                    json={"tasks": batch}
                )
                response.raise_for_status()
                logger.info(f"Persisted {len(batch)} tasks")
        except Exception as e:
            logger.warning(f"Failed to persist tasks: {e}")

    async def flush_all(self):
        """强制刷新所有缓冲区"""
        await self._flush_sessions()
        await self._flush_tasks()

        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                response = await client.post(f"{self.base_url}/api/v1/translation/flush")
                result = response.json()
                logger.info(f"Server flushed: {result}")
                return result
        except Exception as e:
            logger.error(f"Failed to flush on server: {e}")
            return None

    async def get_incomplete_sessions(self) -> List[Dict]:
        """获取未完成的会话"""
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(
                    f"{self.base_url}/api/v1/translation/recovery/incomplete-sessions"
                )
                response.raise_for_status()
                return response.json()['sessions']
        except Exception as e:
            logger.error(f"Failed to get incomplete sessions: {e}")
            return []

    async def restore_session(self, session_id: str) -> Dict:
        """恢复会话数据"""
        try:
            async with httpx.AsyncClient(timeout=30.0) as client:
                response = await client.post(
                    f"{self.base_url}/api/v1/translation/recovery/restore/{session_id}"
                )
                response.raise_for_status()
                return response.json()
        except Exception as e:
            logger.error(f"Failed to restore session {session_id}: {e}")
            raise

    async def query_session(self, session_id: str) -> Dict:
        """查询会话详情"""
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(
                    f"{self.base_url}/api/v1/translation/sessions/{session_id}"
                )
                response.raise_for_status()
                return response.json()
        except Exception as e:
            logger.error(f"Failed to query session {session_id}: {e}")
            return None


async def spec_examples(base_url: str, pause_s: float) -> dict:
    """§10.2's four examples in their order, as a backend would run them (asyncio)."""
    persistence_client = PersistenceClient(base_url)
    seen: dict = {}

    # 示例 1: 持久化会话
    session_data = {
        "session_id": "550e8400-e29b-41d4-a716-446655440000",
        "filename": "game.xlsx",
        "file_path": "/uploads/game.xlsx",
        "status": "processing",
        "llm_provider": "openai",
        "total_tasks": 1000
    }
    await persistence_client.persist_session(session_data)
    seen["sessions_still_in_client"] = len(persistence_client.session_buffer)

    # 示例 2: 持久化任务
    tasks_data = [
        {
            "task_id": f"task_{i}",
            "session_id": "550e8400-e29b-41d4-a716-446655440000",
            "batch_id": "batch_001",
            "sheet_name": "Dialogue",
            "row_index": i,
            "column_name": "Text",
            "source_text": f"Text {i}",
            "status": "pending"
        }
        for i in range(100)
    ]
    await persistence_client.persist_tasks(tasks_data)
    seen["tasks_still_in_client"] = len(persistence_client.task_buffer)
    await asyncio.sleep(pause_s)  # time passes; the daemon may try to write the tasks meanwhile
    async with httpx.AsyncClient() as client:
        seen["health_before_flush"] = (await client.get(f"{base_url}/health")).json()["buffer"]

    # 示例 3: 停止时强制刷新
    seen["flush"] = await persistence_client.flush_all()

    # 示例 4: 启动时恢复会话
    incomplete_sessions = await persistence_client.get_incomplete_sessions()
    seen["incomplete"] = incomplete_sessions
    seen["restored"] = []
    for session in incomplete_sessions:
        restored_data = await persistence_client.restore_session(session['session_id'])
        seen["restored"].append(restored_data)
    seen["queried"] = await persistence_client.query_session(session_data["session_id"])
    return seen


@pytest.mark.parametrize(("flush_interval", "pause_s", "held"), [
    (30, 0, 0),  # the tasks wait in the buffer when their session arrives
    (0.2, 0.6, 100),  # the tasks were tried, and held for their session, when it arrives
])
async def test_the_spec_client_round_trips_through_its_own_examples(db, tmp_path, caplog, flush_interval, pause_s,
                                                                    held):
    """The §10.1 client, run through §10.2's examples in order against the daemon, sends
    its tasks before their session (its session buffer holds 1 of 100) and still gets
    back, after flush_all, the incomplete session and all 100 tasks in row order."""
    caplog.set_level(logging.INFO, logger=__name__)
    async with running(make_config(tmp_path, buffer={"flush_interval": flush_interval})) as d:
        seen = await trio.to_thread.run_sync(asyncio.run, spec_examples(d.url, pause_s))
        assert (seen["sessions_still_in_client"], seen["tasks_still_in_client"]) == (1, 0)
        assert seen["health_before_flush"]["tasks_waiting_for_session"] == held
        assert seen["flush"]["status"] == "flushed"
        assert (seen["flush"]["sessions_written"], seen["flush"]["tasks_written"]) == (1, 100)
        assert seen["flush"]["tasks_waiting_for_session"] == 0
        assert [s["session_id"] for s in seen["incomplete"]] == [SESSION_ID]
        assert seen["incomplete"][0]["pending_tasks"] == 1000
        (restored,) = seen["restored"]
        assert restored["session"]["session_id"] == SESSION_ID
        assert restored["session"]["total_tasks"] == 1000
        assert restored["tasks_count"] == 100
        assert [t["task_id"] for t in restored["tasks"]] == [f"task_{i}" for i in range(100)]
        assert [t["source_text"] for t in restored["tasks"]][:2] == ["Text 0", "Text 1"]
        assert seen["queried"]["session_id"] == SESSION_ID
    assert [r.getMessage() for r in caplog.records if r.name == __name__ and r.levelno >= logging.WARNING] == []
    assert "Persisted 100 tasks" in caplog.text and "Persisted 1 sessions" in caplog.text
    assert await db.query("SELECT COUNT(*) FROM translation_tasks WHERE session_id = %s", SESSION_ID) == ((100,),)
