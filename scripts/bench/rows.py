"""The rows a benchmark prints (one dict per measurement): an aligned table per kind of
measurement, or one JSON object per row; and the devices a row was measured on."""
import json


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def print_rows(rows: list[dict], as_json: bool) -> None:
    """One JSON object per row, or one aligned table per kind of measurement ("what")."""
    if as_json:
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    for what in dict.fromkeys(row["what"] for row in rows):
        group = [row for row in rows if row["what"] == what]
        keys = list(dict.fromkeys(key for row in group for key in row))
        cells = [keys] + [[format_value(row.get(key, "")) for key in keys] for row in group]
        widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
        for line in cells:
            print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        print(flush=True)


def device_name() -> str:
    """The devices in use as "<count>x <device kind>", e.g. "1x cpu"."""
    import jax
    return f"{jax.device_count()}x {jax.devices()[0].device_kind}"
