"""Pure logic of service.sink: what of Elasticsearch's error reasons reaches the logs."""

from __future__ import annotations

from service.sink import _error_reason, classify_item


def test_error_reasons_never_quote_the_records_values() -> None:
    """Mapping errors quote the value ("Preview of field's value", NumberFormatException's
    input string): the reason logged and dead-lettered keeps the field and the error only."""
    info = {
        "error": {
            "type": "document_parsing_exception",
            "reason": "[1:10] failed to parse field [views] of type [long] in document with "
            "id 'x'. Preview of field's value: 'Jane Doe, 12 Elm St'",
            "caused_by": {
                "type": "illegal_argument_exception",
                "reason": 'For input string: "Jane Doe, 12 Elm St"',
            },
        }
    }
    kind, detail = _error_reason(info)
    assert kind == "document_parsing_exception"
    assert "Jane" not in detail and "Elm" not in detail
    assert "[views]" in detail and "[long]" in detail and "illegal_argument_exception" in detail


def test_version_conflicts_keep_both_versions() -> None:
    info = {
        "error": {
            "type": "version_conflict_engine_exception",
            "reason": "[a]: version conflict, current version [9] is higher than the one "
            "provided [0]",
        }
    }
    assert _error_reason(info)[1].endswith(
        "current version [9] is higher than the one provided [0]"
    )


def _item(status: int, error_type: str = "", reason: str = "", **extra: object) -> dict:
    info: dict = {"_id": "x", "status": status, **extra}
    if error_type:
        info["error"] = {"type": error_type, "reason": reason}
    return info


def test_bulk_results_are_classified_document_fault_or_cluster_state() -> None:
    """Only a 400/413 about the document is its fault (a dead letter); the cluster's state
    (429, 5xx, blocks, a missing index or write alias, privileges) is retried, never dropped."""
    assert classify_item(True, "index", _item(201), False)[0] == "written"
    kind, reason, detail = classify_item(
        False, "index", _item(400, "document_parsing_exception", "failed to parse [n]"), False
    )
    assert (kind, reason) == ("rejected", "document_parsing_exception") and "(400)" in detail
    for status, error in (
        (429, "es_rejected_execution_exception"),
        (503, "unavailable_shards_exception"),
        (403, "security_exception"),
        (400, "cluster_block_exception"),
        (404, "index_not_found_exception"),
        (400, "index_closed_exception"),
        (500, "null_pointer_exception"),
    ):
        assert classify_item(False, "index", _item(status, error, "r"), False)[0] == "retry", error
    no_write_index = _item(
        400, "illegal_argument_exception", "no write index is defined for alias [a]"
    )
    assert classify_item(False, "index", no_write_index, False)[0] == "retry"
    conflict = _item(409, "version_conflict_engine_exception", "current version [9] is higher")
    assert classify_item(False, "index", conflict, False)[:2] == ("stale", "version_conflict")
    assert classify_item(False, "delete", _item(404), True)[0] == "not_found"
    assert classify_item(False, "index", _item(404, "x", "y"), False)[0] == "retry"


def test_a_request_refused_as_a_whole_is_split_not_blamed_on_its_documents() -> None:
    whole = _item(413, exception=RuntimeError("Request Entity Too Large"))
    assert classify_item(False, "index", whole, False)[0] == "request_refused"
    gateway = _item(502, exception=RuntimeError("Bad Gateway"))
    assert classify_item(False, "index", gateway, False)[:2] == ("retry", "request_502")
