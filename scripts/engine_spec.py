"""The engine strings of the bench scripts' command lines, torch-free (a parent process that only starts
children parses them too): `fast`, `fast:linear=torch,decode_attention=flash`, lists of them."""
from __future__ import annotations


def engine_list(text: str) -> list[str]:
    """'fast,fast:linear=torch,decode_attention=flash' -> ['fast', 'fast:linear=torch,decode_attention=flash']:
    a comma separates engines and one engine's options alike, so an item with '=' and no ':' is one more
    option of the engine before it."""
    engines: list[str] = []
    for item in filter(None, text.split(",")):
        if "=" in item and ":" not in item:
            if not engines:
                raise ValueError(f"--engines: option {item!r} before any engine")
            engines[-1] += "," + item
        else:
            engines.append(item)
    return engines


def engine_options(name: str) -> tuple[str, dict]:
    """`fast`, `fast:compile=0,graph=1` or `fast:decode_attention=sdpa` -> (engine, its keyword options):
    digits are switches, anything else a string."""
    engine, _, options = name.partition(":")
    return engine, {k: bool(int(v)) if v.isdigit() else v for k, v in (o.split("=") for o in options.split(",") if o)}
