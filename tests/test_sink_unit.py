"""Pure logic of service.sink: what of Elasticsearch's error reasons reaches the logs."""

from __future__ import annotations

from service.sink import _error_reason


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
