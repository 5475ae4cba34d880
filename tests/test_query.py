"""The query API: spec §4 and DESIGN.md's rules for pagination, derived fields and reads.

Rows with known times are inserted straight into MariaDB (TIMESTAMP columns, UTC); rows
that must still be in the buffer are sent over HTTP to a daemon that flushes only every
30 s. Every answer is checked for its exact set of keys, as the spec prints them.
"""

import math
import re
from datetime import datetime, timedelta

import pytest

from conftest import SESSION_ID, session, task

SESSIONS = "/api/v1/translation/sessions"
TASKS = "/api/v1/translation/tasks"
SESSIONS_BATCH = "/api/v1/translation/sessions/batch"
TASKS_BATCH = "/api/v1/translation/tasks/batch"

# The keys of spec §4, as printed there.
PAGE_KEYS = {"total", "page", "page_size", "total_pages", "items"}  # §4.1, §4.5
SESSION_PAGE_TASK_KEYS = PAGE_KEYS | {"session_id"}  # §4.3
SESSION_SUMMARY_KEYS = {  # §4.1 items
    "session_id", "filename", "status", "total_tasks", "completed_tasks", "failed_tasks",
    "processing_tasks", "pending_tasks", "progress", "created_at", "updated_at"}
SESSION_DETAIL_KEYS = SESSION_SUMMARY_KEYS | {  # §4.2
    "file_path", "game_info", "llm_provider", "metadata", "estimated_completion"}
TASK_ITEM_KEYS = {  # §4.3 items
    "task_id", "batch_id", "sheet_name", "row_index", "column_name", "source_text", "target_text",
    "status", "error_message", "retry_count", "confidence", "created_at", "updated_at"}
TASK_DETAIL_KEYS = TASK_ITEM_KEYS | {  # §4.4, and the items of §4.5
    "session_id", "context", "start_time", "end_time", "duration_ms"}
ERROR_KEYS = {"detail", "error_code", "errors"}

UTC_TIME = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")
BASE = datetime(2025, 9, 1)  # naive UTC, as the TIMESTAMP columns compare


def z(value: datetime) -> str:
    """A naive UTC time as the API prints it."""
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def assert_utc_time(value) -> datetime:
    assert isinstance(value, str) and UTC_TIME.match(value), value
    return datetime.fromisoformat(value)


# ── rows straight into the database ──────────────────────────────────────────────────


def srow(session_id, status="processing", created_at=BASE, updated_at=None, **fields):
    return {"session_id": session_id, "filename": f"{session_id}.xlsx", "file_path": f"/uploads/{session_id}.xlsx",
            "status": status, "llm_provider": "openai", "total_tasks": 0, "completed_tasks": 0,
            "failed_tasks": 0, "processing_tasks": 0, "created_at": created_at,
            "updated_at": updated_at or created_at, **fields}


def trow(task_id, session_id=SESSION_ID, status="pending", created_at=BASE, updated_at=None, **fields):
    return {"task_id": task_id, "session_id": session_id, "batch_id": "batch_001", "sheet_name": "Dialogue",
            "row_index": 0, "column_name": "Text", "source_text": f"source {task_id}", "status": status,
            "created_at": created_at, "updated_at": updated_at or created_at, **fields}


async def insert_sessions(db, rows):
    await db.insert("translation_sessions", rows)


async def insert_tasks(db, rows):
    await db.insert("translation_tasks", rows)


async def get_ok(d, path, **params):
    r = await d.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def walk(d, path, page_size, **params):
    """Every page of a list, page 1 up to total_pages; returns (pages, first answer)."""
    first = await get_ok(d, path, page=1, page_size=page_size, **params)
    pages = [first["items"]]
    for page in range(2, first["total_pages"] + 1):
        pages.append((await get_ok(d, path, page=page, page_size=page_size, **params))["items"])
    return pages, first


# ── shapes ───────────────────────────────────────────────────────────────────────────

FULL_SESSION = session(game_info={"game_name": "Fantasy RPG", "source_language": "en"},
                       metadata={"user_id": "user_123"}, total_tasks=1000, completed_tasks=350,
                       failed_tasks=5, processing_tasks=10)
FULL_TASK = task(target_text="你好，冒险者！", context="NPC greeting dialogue", status="completed",
                 confidence=0.95, error_message=None, retry_count=0, start_time="2025-09-30T10:10:00Z",
                 end_time="2025-09-30T18:10:05+08:00", duration_ms=5000)


async def test_every_query_answer_has_exactly_the_spec_keys_and_z_times(daemon):
    """Each §4 endpoint answers with exactly the spec's keys, every time in UTC with a Z."""
    await daemon.post(SESSIONS_BATCH, {"sessions": [FULL_SESSION]})
    await daemon.post(TASKS_BATCH, {"tasks": [FULL_TASK]})
    await daemon.flush()

    page = await get_ok(daemon, SESSIONS)
    assert set(page) == PAGE_KEYS
    (item,) = page["items"]
    assert set(item) == SESSION_SUMMARY_KEYS
    for name in ("created_at", "updated_at"):
        assert_utc_time(item[name])

    detail = await get_ok(daemon, f"{SESSIONS}/{SESSION_ID}")
    assert set(detail) == SESSION_DETAIL_KEYS
    assert detail["game_info"] == FULL_SESSION["game_info"] and detail["metadata"] == {"user_id": "user_123"}
    assert (detail["file_path"], detail["llm_provider"]) == ("/uploads/game.xlsx", "openai")
    assert detail["estimated_completion"] is None  # created_at == updated_at: no rate yet
    assert {k: detail[k] for k in SESSION_SUMMARY_KEYS} == item

    tasks_page = await get_ok(daemon, f"{SESSIONS}/{SESSION_ID}/tasks")
    assert set(tasks_page) == SESSION_PAGE_TASK_KEYS
    assert tasks_page["session_id"] == SESSION_ID
    (task_item,) = tasks_page["items"]
    assert set(task_item) == TASK_ITEM_KEYS

    task_detail = await get_ok(daemon, f"{TASKS}/task_001")
    assert set(task_detail) == TASK_DETAIL_KEYS
    assert task_detail == {**{k: v for k, v in FULL_TASK.items()}, "end_time": "2025-09-30T10:10:05Z",
                           "created_at": task_detail["created_at"], "updated_at": task_detail["updated_at"]}
    for name in ("created_at", "updated_at", "start_time", "end_time"):
        assert_utc_time(task_detail[name])
    assert {k: task_detail[k] for k in TASK_ITEM_KEYS} == task_item

    all_tasks = await get_ok(daemon, TASKS)
    assert set(all_tasks) == PAGE_KEYS
    assert all_tasks["items"] == [task_detail]  # §4.5 items have the §4.4 shape


async def test_empty_lists_have_zero_pages(daemon):
    """With no rows, lists answer total 0, total_pages 0 and no items; a known session's
    task list likewise."""
    for path in (SESSIONS, TASKS):
        assert await get_ok(daemon, path) == {"total": 0, "page": 1, "page_size": 20, "total_pages": 0, "items": []}
    await daemon.post(SESSIONS_BATCH, {"sessions": [session()]})
    await daemon.flush()
    assert await get_ok(daemon, f"{SESSIONS}/{SESSION_ID}/tasks") == {
        "session_id": SESSION_ID, "total": 0, "page": 1, "page_size": 20, "total_pages": 0, "items": []}


# ── derived fields ───────────────────────────────────────────────────────────────────

DERIVED = [
    # (total, completed, failed, processing) → (pending_tasks, progress)
    ((1000, 350, 5, 10), (635, 35.0)),  # the spec's example
    ((3, 1, 0, 0), (2, 33.3)),
    ((3, 2, 0, 0), (1, 66.7)),
    ((7, 7, 0, 0), (0, 100.0)),
    ((0, 0, 0, 0), (0, 0.0)),  # no division by zero
    ((10, 8, 3, 1), (0, 80.0)),  # more done than total: pending clamps at 0
    ((None, 2, 0, 0), (0, 0.0)),  # total stored as NULL
]


async def test_pending_tasks_and_progress_are_derived_as_designed(daemon, db):
    """pending = max(total - completed - failed - processing, 0); progress = round(100 *
    completed / total, 1), 0.0 for total 0, in the list and the detail alike."""
    await insert_sessions(db, [
        srow(f"s{i}", total_tasks=t, completed_tasks=c, failed_tasks=f, processing_tasks=p)
        for i, ((t, c, f, p), _) in enumerate(DERIVED)])
    page = await get_ok(daemon, SESSIONS, page_size=100)
    by_id = {item["session_id"]: item for item in page["items"]}
    for i, ((total, *_), (pending, progress)) in enumerate(DERIVED):
        item = by_id[f"s{i}"]
        assert (item["total_tasks"], item["pending_tasks"], item["progress"]) == (total, pending, progress), item
        assert isinstance(item["progress"], float)
        detail = await get_ok(daemon, f"{SESSIONS}/s{i}")
        assert (detail["pending_tasks"], detail["progress"]) == (pending, progress)


CREATED = datetime(2025, 9, 30, 10, 0, 0)
UPDATED = datetime(2025, 9, 30, 10, 5, 0)


@pytest.mark.parametrize(("fields", "expected"), [
    # 250 done in 300 s; 750 left (processing still counts as left) → 900 s after updated_at
    (dict(total_tasks=1000, completed_tasks=250, processing_tasks=10), "2025-09-30T10:20:00Z"),
    # failed tasks are not left to do: 700 left → 840 s
    (dict(total_tasks=1000, completed_tasks=250, failed_tasks=50), "2025-09-30T10:19:00Z"),
    # 3 done in 300 s, 1 left → 100 s
    (dict(total_tasks=4, completed_tasks=3), "2025-09-30T10:06:40Z"),
    (dict(status="completed", total_tasks=1000, completed_tasks=250), None),  # finished
    (dict(status="failed", total_tasks=1000, completed_tasks=250), None),
    (dict(status="cancelled", total_tasks=1000, completed_tasks=250), None),
    (dict(total_tasks=1000, completed_tasks=0), None),  # no rate yet
    (dict(total_tasks=1000, completed_tasks=900, failed_tasks=100), None),  # nothing left
    (dict(total_tasks=1000, completed_tasks=250, updated_at=CREATED), None),  # no time elapsed
])
async def test_estimated_completion_extrapolates_the_rate_since_created_at(daemon, db, fields, expected):
    """estimated_completion = updated_at + left * (updated_at - created_at) / completed,
    null when the session is finished, nothing is completed or nothing is left."""
    await insert_sessions(db, [srow(SESSION_ID, created_at=CREATED, updated_at=UPDATED) | fields])
    detail = await get_ok(daemon, f"{SESSIONS}/{SESSION_ID}")
    assert detail["estimated_completion"] == expected
    assert (detail["created_at"], detail["updated_at"]) == (z(CREATED), z(fields.get("updated_at", UPDATED)))


# ── filters ──────────────────────────────────────────────────────────────────────────


async def test_session_filters_combine_status_and_inclusive_dates(daemon, db):
    """status, from_date and to_date filter together on created_at, both bounds inclusive."""
    rows = [srow(f"s{i:02}", status=("processing", "completed")[i % 2], created_at=BASE + timedelta(days=i))
            for i in range(20)]
    rows.append(srow("edge-after", created_at=BASE + timedelta(days=10, seconds=1)))
    rows.append(srow("edge-before", created_at=BASE + timedelta(days=4, seconds=-1)))
    await insert_sessions(db, rows)
    # s04..s10 created within the bounds; the processing ones are the even ones
    expected = {"s04", "s06", "s08", "s10"}
    for from_date, to_date in [
        ("2025-09-05T00:00:00Z", "2025-09-11T00:00:00Z"),
        ("2025-09-05T02:00:00+02:00", "2025-09-10T20:00:00-04:00"),  # offsets are converted
        ("2025-09-05T00:00:00", "2025-09-11T00:00:00"),  # naive times are UTC
    ]:
        page = await get_ok(daemon, SESSIONS, status="processing", from_date=from_date, to_date=to_date)
        assert page["total"] == len(expected)
        assert {i["session_id"] for i in page["items"]} == expected
    page = await get_ok(daemon, SESSIONS, from_date="2025-09-05T00:00:00Z")
    assert page["total"] == 16 + 1  # s04..s19 and edge-after
    page = await get_ok(daemon, SESSIONS, to_date="2025-09-05T00:00:00Z", status="completed")
    assert {i["session_id"] for i in page["items"]} == {"s01", "s03"}


async def test_task_filters_combine_session_status_and_dates(daemon, db):
    """/tasks filters by session_id, status and created_at range together."""
    await insert_sessions(db, [srow("A"), srow("B")])
    rows = [trow(f"{sid}-{i:02}", session_id=sid, status=("pending", "completed", "failed")[i % 3],
                 created_at=BASE + timedelta(hours=i))
            for sid in ("A", "B") for i in range(12)]
    await insert_tasks(db, rows)
    page = await get_ok(daemon, TASKS, session_id="A", status="completed",
                        from_date="2025-09-01T04:00:00Z", to_date="2025-09-01T10:00:00Z")
    assert page["total"] == 3  # sit on the bounds
    assert [i["task_id"] for i in page["items"]] == ["A-10", "A-07", "A-04"]
    page = await get_ok(daemon, TASKS, session_id="A", status="completed")
    assert [i["task_id"] for i in page["items"]] == ["A-10", "A-07", "A-04", "A-01"]
    page = await get_ok(daemon, TASKS, status="failed", to_date="2025-09-01T05:00:00Z")
    assert [i["task_id"] for i in page["items"]] == ["B-05", "A-05", "B-02", "A-02"]
    page = await get_ok(daemon, TASKS, session_id="C")
    assert (page["total"], page["items"]) == (0, [])


async def test_task_totals_equal_count_star_for_windows_that_cut_through_hours(daemon, db):
    """`total` sums whole hours from task_counts and counts the partial hours at both ends
    in the tasks: for every window (bounds inside an hour, on it, a second either side,
    with fractions of a second, inside one hour, empty, reversed, beyond the TIMESTAMP
    range) and every filter it equals COUNT(*) over the tasks."""
    await insert_sessions(db, [srow("A"), srow("B")])
    await insert_tasks(db, [
        trow(f"{sid}-{i:03}", session_id=sid, status=("pending", "completed", "failed")[i % 3],
             created_at=BASE + timedelta(minutes=17 * i, seconds=i % 2))
        for sid in ("A", "B") for i in range(40)])  # 11 hours, 3 to 4 tasks an hour
    edges = [BASE + timedelta(hours=h, minutes=m, seconds=sec, microseconds=us)
             for h in (0, 2, 3, 7) for m, sec, us in ((0, 0, 0), (0, -1, 0), (0, 1, 0), (34, 0, 0), (34, 0, 500_000))]
    windows = [(None, None), (None, datetime(9999, 12, 31)), (datetime(1, 1, 1), None)]
    windows += [(lo, hi) for lo in [None, *edges] for hi in [None, *edges]]
    filters = [{}, {"session_id": "A"}, {"status": "completed"}, {"session_id": "B", "status": "failed"}]
    for lo, hi in windows:
        for equal in filters:
            where = [f"{name} = %s" for name in equal] + ["created_at >= %s"] * (lo is not None) + \
                ["created_at <= %s"] * (hi is not None)
            args = [*equal.values(), *[t for t in (lo, hi) if t is not None]]
            ((expected,),) = await db.query("SELECT COUNT(*) FROM translation_tasks"
                                            + (" WHERE " + " AND ".join(where) if where else ""), *args)
            params = {**equal, **({"from_date": lo.isoformat() + "Z"} if lo else {}),
                      **({"to_date": hi.isoformat() + "Z"} if hi else {})}
            assert (await get_ok(daemon, TASKS, **params))["total"] == expected, params


async def test_session_task_filters_combine_status_and_sheet_in_sheet_order(daemon, db):
    """Tasks of a session filter by status and sheet_name, and come in sheet order
    (sheet_name, row_index numerically, column_name, task_id)."""
    await insert_sessions(db, [srow(SESSION_ID), srow("other")])
    specs = [("t1", "menu", 2, "Text", "failed"), ("t2", "dialogue", 10, "Text", "failed"),
             ("t3", "dialogue", 2, "Text", "failed"), ("t4", "dialogue", 2, "Note", "failed"),
             ("t0", "dialogue", 2, "Note", "failed"), ("t5", "dialogue", 3, "Text", "pending"),
             ("t6", "menu", 1, "Text", "pending")]
    await insert_tasks(db, [trow(t, sheet_name=s, row_index=r, column_name=c, status=st) for t, s, r, c, st in specs]
                       + [trow("x1", session_id="other", sheet_name="dialogue", status="failed")])
    page = await get_ok(daemon, f"{SESSIONS}/{SESSION_ID}/tasks", page_size=100)
    assert [i["task_id"] for i in page["items"]] == ["t0", "t4", "t3", "t5", "t2", "t6", "t1"]
    page = await get_ok(daemon, f"{SESSIONS}/{SESSION_ID}/tasks", status="failed", sheet_name="dialogue")
    assert page["total"] == 4
    assert [i["task_id"] for i in page["items"]] == ["t0", "t4", "t3", "t2"]
    page = await get_ok(daemon, f"{SESSIONS}/{SESSION_ID}/tasks", status="pending", sheet_name="menu")
    assert [i["task_id"] for i in page["items"]] == ["t6"]


# ── pagination ───────────────────────────────────────────────────────────────────────


def tied(i: int) -> datetime:
    """45 rows in 5 distinct seconds: many created_at ties to break."""
    return BASE + timedelta(seconds=i % 5)


async def test_session_pages_split_45_rows_into_disjoint_pages_in_every_order(daemon, db):
    """total 45 at page_size 20 is 3 pages (ceil) of 20, 20, 5, disjoint, together all rows,
    ordered by sort_by and order with session_id breaking ties in the same direction."""
    rows = [srow(f"s{i:02}", created_at=tied(i), updated_at=tied(i) + timedelta(seconds=(7 * i) % 45))
            for i in range(45)]
    await insert_sessions(db, rows)
    for sort_by in ("created_at", "updated_at"):
        for order in ("asc", "desc"):
            expected = [r["session_id"] for r in sorted(rows, key=lambda r: (r[sort_by], r["session_id"]),
                                                        reverse=order == "desc")]
            pages, first = await walk(daemon, SESSIONS, 20, sort_by=sort_by, order=order)
            assert (first["total"], first["total_pages"], first["page_size"]) == (45, 3, 20)
            assert [len(p) for p in pages] == [20, 20, 5]
            assert [i["session_id"] for p in pages for i in p] == expected, (sort_by, order)
    default, _ = await walk(daemon, SESSIONS, 20)  # created_at desc
    assert [i["session_id"] for p in default for i in p] == sorted(
        (r["session_id"] for r in rows), key=lambda s: (tied(int(s[1:])), s), reverse=True)
    beyond = await get_ok(daemon, SESSIONS, page=4, page_size=20)
    assert (beyond["total"], beyond["total_pages"], beyond["items"]) == (45, 3, [])


@pytest.mark.parametrize(("page_size", "pages"), [(20, 3), (7, 7), (45, 1), (44, 2), (100, 1), (1, 45)])
async def test_total_pages_is_the_ceiling_of_total_over_page_size(daemon, db, page_size, pages):
    """total_pages = ceil(total / page_size), and every page but the last is full."""
    await insert_sessions(db, [srow(SESSION_ID)])
    await insert_tasks(db, [trow(f"t{i:02}", created_at=tied(i)) for i in range(45)])
    seen, first = await walk(daemon, TASKS, page_size)
    assert (first["total"], first["total_pages"]) == (45, pages) and pages == math.ceil(45 / page_size)
    assert [len(p) for p in seen] == [page_size] * (pages - 1) + [45 - page_size * (pages - 1)]


async def test_task_list_is_newest_first_with_task_id_breaking_ties(daemon, db):
    """/tasks orders created_at DESC, task_id DESC: 45 tied rows page deterministically."""
    await insert_sessions(db, [srow("A"), srow("B")])
    rows = [trow(f"t{i:02}", session_id="AB"[i % 2], created_at=tied(i)) for i in range(45)]
    await insert_tasks(db, rows)
    expected = [r["task_id"] for r in sorted(rows, key=lambda r: (r["created_at"], r["task_id"]), reverse=True)]
    for _ in range(2):  # and the same again
        pages, first = await walk(daemon, TASKS, 20)
        assert (first["total"], first["total_pages"]) == (45, 3)
        assert [i["task_id"] for p in pages for i in p] == expected


async def test_session_task_pages_are_disjoint_and_in_sheet_order(daemon, db):
    """45 tasks of one session over pages of 20: sheet order, nothing repeated or lost."""
    await insert_sessions(db, [srow(SESSION_ID)])
    rows = [trow(f"t{i:02}", sheet_name=f"sheet{i % 3}", row_index=i % 4, column_name="Text")
            for i in range(45)]
    await insert_tasks(db, rows)
    expected = [r["task_id"] for r in sorted(rows, key=lambda r: (r["sheet_name"], r["row_index"], r["task_id"]))]
    pages, first = await walk(daemon, f"{SESSIONS}/{SESSION_ID}/tasks", 20)
    assert (first["session_id"], first["total"], first["total_pages"]) == (SESSION_ID, 45, 3)
    assert [i["task_id"] for p in pages for i in p] == expected


async def test_ascending_pages_neither_repeat_nor_skip_while_sessions_are_written(daemon, db):
    """Walking sort_by=created_at&order=asc while new sessions are written between page
    fetches shows every session that existed before exactly once, in order; the new
    ones come only after them."""
    old = [srow(f"s{i:02}", created_at=tied(i)) for i in range(45)]
    await insert_sessions(db, old)
    expected = [r["session_id"] for r in sorted(old, key=lambda r: (r["created_at"], r["session_id"]))]
    seen, page, written = [], 1, 0
    while True:
        items = (await get_ok(daemon, SESSIONS, page=page, page_size=20, sort_by="created_at", order="asc"))["items"]
        seen += [i["session_id"] for i in items]
        if len(items) < 20:
            break
        # ids that sort before every old id: only created_at keeps them at the end
        batch = [session(f"0new-{written + k:02}") for k in range(7)]
        assert (await daemon.post(SESSIONS_BATCH, {"sessions": batch})).status_code == 202
        await daemon.flush()
        written += len(batch)
        page += 1
    assert seen[:45] == expected
    assert all(s.startswith("0new-") for s in seen[45:]) and len(seen) == len(set(seen))
    assert len(seen) == 45 + written


async def test_newest_first_task_pages_put_new_rows_at_the_front(daemon, db):
    """Tasks written while a client pages through /tasks appear at the front of page 1;
    the rows that existed keep their order behind them."""
    await insert_sessions(db, [srow(SESSION_ID)])
    old = [trow(f"t{i:02}", created_at=tied(i)) for i in range(45)]
    await insert_tasks(db, old)
    expected_old = [r["task_id"] for r in sorted(old, key=lambda r: (r["created_at"], r["task_id"]), reverse=True)]
    before = await get_ok(daemon, TASKS, page=1, page_size=20)
    assert [i["task_id"] for i in before["items"]] == expected_old[:20]
    new = [task(f"new-{k}") for k in range(5)]
    await daemon.post(TASKS_BATCH, {"tasks": new})
    await daemon.flush()
    pages, first = await walk(daemon, TASKS, 20)
    ids = [i["task_id"] for p in pages for i in p]
    assert first["total"] == 50
    assert set(ids[:5]) == {t["task_id"] for t in new}
    assert ids[5:] == expected_old


# ── refusals ─────────────────────────────────────────────────────────────────────────

BAD_PARAMS = [
    (SESSIONS, {"page": "0"}, "page"),
    (SESSIONS, {"page": "-1"}, "page"),
    (SESSIONS, {"page": "one"}, "page"),
    (SESSIONS, {"page_size": "101"}, "page_size"),
    (SESSIONS, {"page_size": "0"}, "page_size"),
    (SESSIONS, {"status": "paused"}, "status"),
    (SESSIONS, {"status": ""}, "status"),
    (SESSIONS, {"sort_by": "filename"}, "sort_by"),
    (SESSIONS, {"order": "up"}, "order"),
    (SESSIONS, {"from_date": "yesterday"}, "from_date"),
    (SESSIONS, {"from_date": "2025-09-30"}, "from_date"),  # a date alone is not a date-time
    (SESSIONS, {"to_date": "2025-09-30T25:00:00Z"}, "to_date"),
    (SESSIONS, {"sheet_name": "Dialogue"}, "sheet_name"),  # not a parameter of §4.1
    (SESSIONS, {"limit": "10"}, "limit"),
    (TASKS, {"page": "0"}, "page"),
    (TASKS, {"page_size": "101"}, "page_size"),
    (TASKS, {"page_size": "0"}, "page_size"),
    (TASKS, {"status": "cancelled"}, "status"),  # a session status, not a task status
    (TASKS, {"from_date": "2025-13-01T00:00:00Z"}, "from_date"),
    (TASKS, {"to_date": "now"}, "to_date"),
    (TASKS, {"sort_by": "created_at"}, "sort_by"),  # not a parameter of §4.5
    (TASKS, {"offset": "20"}, "offset"),
    (f"{SESSIONS}/{SESSION_ID}/tasks", {"page": "0"}, "page"),
    (f"{SESSIONS}/{SESSION_ID}/tasks", {"page_size": "101"}, "page_size"),
    (f"{SESSIONS}/{SESSION_ID}/tasks", {"status": "done"}, "status"),
    (f"{SESSIONS}/{SESSION_ID}/tasks", {"from_date": "2025-09-30T00:00:00Z"}, "from_date"),
    (TASKS, [("status", "failed"), ("status", "processing")], "status"),  # which would count?
    (SESSIONS, {"status": "null"}, "status"),  # "no filter" is leaving it out
    (TASKS, {"from_date": "null"}, "from_date"),
    (SESSIONS, {"page": "1.0"}, "page"),
    (TASKS, {"page_size": "1e1"}, "page_size"),
    (TASKS, {"page": "+1"}, "page"),
    (SESSIONS, {"to_date": "0.5"}, "to_date"),  # not a Unix time
    (TASKS, {"from_date": "1700000000"}, "from_date"),
]


@pytest.mark.parametrize(("path", "params", "field"), BAD_PARAMS)
async def test_bad_query_parameters_are_422_naming_the_parameter(daemon, path, params, field):
    """Out-of-range pages, unknown enum values, bad dates and unknown parameters are 422
    in the error format, naming the parameter."""
    await daemon.post(SESSIONS_BATCH, {"sessions": [session()]})
    r = await daemon.get(path, params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS
    assert body["error_code"] == "VALIDATION_ERROR" and isinstance(body["detail"], str)
    assert [e["field"] for e in body["errors"]] == [field]
    assert body["errors"][0]["message"]


@pytest.mark.parametrize("params", [
    {"from_date": "0001-01-01T00:00:00+01:00"},
    {"to_date": "9999-12-31T23:59:59-01:00"},
])
async def test_dates_at_the_edge_of_the_calendar_are_not_a_500(daemon, params):
    """A well-formed date-time whose UTC value falls outside Python's calendar is the
    client's mistake (422) or simply matches nothing (200), never a 500."""
    for path in (SESSIONS, TASKS):
        r = await daemon.get(path, params=params)
        assert r.status_code in (200, 422), (path, r.status_code, r.text)


@pytest.mark.parametrize("page", ["9223372036854775807", "99999999999999999999"])
async def test_a_page_far_beyond_the_end_is_not_a_database_error(daemon, page):
    """A huge page number is an empty page (200) or refused (422); it must not reach MySQL
    as an OFFSET it cannot parse and come back as 503 'database did not answer'."""
    for path in (SESSIONS, TASKS):
        r = await daemon.get(path, params={"page": page, "page_size": "100"})
        assert r.status_code in (200, 422), (path, r.status_code, r.text)
        if r.status_code == 200:
            assert r.json()["items"] == []


async def test_injection_attempts_are_refused_or_inert_and_the_tables_survive(daemon, db):
    """SQL in enum parameters is 422; SQL in free-text filters matches nothing; the
    tables and their rows are intact afterwards."""
    await insert_sessions(db, [srow(SESSION_ID)])
    await insert_tasks(db, [trow(f"t{i}") for i in range(3)])
    for path, params in [
        (SESSIONS, {"sort_by": "created_at; DROP TABLE translation_tasks"}),
        (SESSIONS, {"order": "desc; DELETE FROM translation_sessions"}),
        (SESSIONS, {"status": "x' OR '1'='1"}),
        (TASKS, {"status": "x' OR '1'='1"}),
        (TASKS, {"page_size": "1; DROP TABLE translation_tasks"}),
        (f"{SESSIONS}/{SESSION_ID}/tasks", {"status": "pending' OR '1'='1"}),
    ]:
        r = await daemon.get(path, params=params)
        assert r.status_code == 422, (path, params, r.text)
    for path, params in [
        (TASKS, {"session_id": "x' OR '1'='1"}),
        (TASKS, {"session_id": f"{SESSION_ID}' -- "}),
        (f"{SESSIONS}/{SESSION_ID}/tasks", {"sheet_name": "x' OR 1=1 -- "}),
    ]:
        page = await get_ok(daemon, path, **params)
        assert (page["total"], page["items"]) == (0, []), params
    r = await daemon.get(f"{SESSIONS}/x' OR '1'='1")
    assert r.status_code == 404
    assert await db.query("SELECT COUNT(*) FROM translation_sessions") == ((1,),)
    assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((3,),)


# ── single rows: the buffer laid over the database ───────────────────────────────────


async def test_single_row_gets_show_rows_accepted_but_not_yet_written(slow_daemon, db):
    """GET /sessions/{id} and /tasks/{id} answer from the buffer before any flush, with the
    derived fields; list endpoints read the database only."""
    d = slow_daemon
    await d.post(SESSIONS_BATCH, {"sessions": [session(total_tasks=10, completed_tasks=2, metadata={"k": 1})]})
    r = await d.post(TASKS_BATCH, {"tasks": [task(target_text="A", confidence=0.5)]})
    accepted = r.json()["timestamp"]
    assert await db.query("SELECT COUNT(*) FROM translation_sessions") == ((0,),)
    s = await get_ok(d, f"{SESSIONS}/{SESSION_ID}")
    assert set(s) == SESSION_DETAIL_KEYS
    assert (s["status"], s["total_tasks"], s["completed_tasks"], s["pending_tasks"], s["progress"]) == (
        "processing", 10, 2, 8, 20.0)
    assert (s["failed_tasks"], s["processing_tasks"], s["game_info"], s["metadata"]) == (0, 0, None, {"k": 1})
    assert s["created_at"] == s["updated_at"]
    assert_utc_time(s["created_at"])
    t = await get_ok(d, f"{TASKS}/task_001")
    assert set(t) == TASK_DETAIL_KEYS
    assert (t["target_text"], t["confidence"], t["status"], t["retry_count"]) == ("A", 0.5, "pending", 0)
    assert t["created_at"] == t["updated_at"] == accepted
    # the lists read the database: nothing there yet, but the session is known
    assert (await get_ok(d, SESSIONS))["total"] == 0
    assert (await get_ok(d, f"{SESSIONS}/{SESSION_ID}/tasks"))["total"] == 0


async def test_single_row_gets_merge_buffered_partial_updates_over_the_stored_row(slow_daemon, db):
    """An update still in the buffer is laid over the stored row field by field: absent
    fields keep the stored value, null clears, created_at stays the stored one."""
    d = slow_daemon
    await d.post(SESSIONS_BATCH, {"sessions": [session(total_tasks=10, completed_tasks=2, game_info={"g": 1})]})
    await d.post(TASKS_BATCH, {"tasks": [task(target_text="A", confidence=0.5, retry_count=2, context="NPC")]})
    await d.flush()
    await db.query("UPDATE translation_sessions SET created_at = %s, updated_at = %s", CREATED, UPDATED)
    await db.query("UPDATE translation_tasks SET created_at = %s, updated_at = %s", CREATED, UPDATED)

    await d.post(SESSIONS_BATCH, {"sessions": [session(completed_tasks=5, game_info=None)]})
    await d.post(TASKS_BATCH, {"tasks": [task(status="completed", confidence=None)]})
    r = await d.post(TASKS_BATCH, {"tasks": [task(status="completed", retry_count=3)]})
    accepted = r.json()["timestamp"]

    s = await get_ok(d, f"{SESSIONS}/{SESSION_ID}")
    assert (s["total_tasks"], s["completed_tasks"], s["progress"], s["pending_tasks"]) == (10, 5, 50.0, 5)
    assert s["game_info"] is None
    assert s["created_at"] == z(CREATED) and s["updated_at"] > z(UPDATED)
    assert s["estimated_completion"] is not None  # rate: 5 done since CREATED
    t = await get_ok(d, f"{TASKS}/task_001")
    assert (t["status"], t["target_text"], t["confidence"], t["retry_count"], t["context"]) == (
        "completed", "A", None, 3, "NPC")
    assert (t["created_at"], t["updated_at"]) == (z(CREATED), accepted)
    # still only in the buffer
    assert await db.query("SELECT status, confidence, retry_count FROM translation_tasks") == (("pending", 0.5, 2),)
    await d.flush()
    assert await get_ok(d, f"{TASKS}/task_001") == t


async def test_a_task_waiting_for_its_session_is_visible_to_its_get(slow_daemon):
    """A task held because its session has not arrived is still answered by GET /tasks/{id};
    its session is not (404)."""
    d = slow_daemon
    await d.post(TASKS_BATCH, {"tasks": [task(session_id="later")]})
    assert (await d.flush())["tasks_waiting_for_session"] == 1
    t = await get_ok(d, f"{TASKS}/task_001")
    assert (t["session_id"], t["status"]) == ("later", "pending")
    assert (await d.get(f"{SESSIONS}/later")).status_code == 404


# ── not found ────────────────────────────────────────────────────────────────────────


async def test_unknown_ids_are_404_with_the_id_in_the_body(daemon, db):
    """Unknown session, unknown task, and the task list of an unknown session are 404 in
    the error format, carrying the id asked for."""
    await insert_sessions(db, [srow(SESSION_ID)])
    await insert_tasks(db, [trow("task_001")])
    for path, body in [
        (f"{SESSIONS}/nope", {"detail": "Session not found", "session_id": "nope"}),
        (f"{SESSIONS}/nope/tasks", {"detail": "Session not found", "session_id": "nope"}),
        (f"{SESSIONS}/{SESSION_ID.upper()}", {"detail": "Session not found", "session_id": SESSION_ID.upper()}),
        (f"{TASKS}/nope", {"detail": "Task not found", "task_id": "nope"}),
        (f"{TASKS}/TASK_001", {"detail": "Task not found", "task_id": "TASK_001"}),
    ]:
        r = await daemon.get(path)
        assert r.status_code == 404, path
        assert r.json() == {**body, "error_code": "NOT_FOUND", "errors": []}
    assert (await daemon.get(f"{SESSIONS}/{SESSION_ID}/tasks")).status_code == 200
