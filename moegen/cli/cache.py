"""``moegen cache ...``: look at, check, clean and move the kernel cache (a thin layer over
`moegen.cache` and `moegen.deploy`, which hold the logic).  Registered by `moegen.cli`.

    moegen cache ls [--json]                    every entry of every layer
    moegen cache info [--json]                  directories, trust, layers, totals, settings
    moegen cache explain SPEC-OPTIONS [--json]  a spec's key parts, key, and matching entries
    moegen cache explain ENTRY [--json]         what an entry `cache ls` lists was built from
    moegen cache verify [--repair]              check every entry; exit 1 on problems
    moegen cache clear [--yes]                  empty the writable cache
    moegen cache prune [--older-than DAYS] [--max-size SIZE]
    moegen cache export ARCHIVE [--name N ...] [--sign KEYFILE]
    moegen cache import ARCHIVE [--prebuilt DIR [--replace]] [--verify PUBKEY]
    moegen keygen OUT                           (registered on the main CLI)

Every command exits non-zero on failure.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

import click

from .. import jit, settings
from ..cache import default_cache, digest
from ..cache_format import entry_name
from ..console import table
from ..deploy import export_archive, extract_archive, import_archive
from ..errors import MoegenError
from .options import parse_spec_args


def _cache():
    return default_cache()


def _fail(exc: Exception):
    raise click.ClickException(str(exc)) from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _entry_dict(e) -> dict:
    return {"entry": e.entry, "name": e.name, "key": e.key, "backend": e.backend,
            "target": e.target, "size": e.size, "created": e.created, "layer": e.layer}


@click.group()
def cache():
    """Inspect and manage the kernel cache (MOEGEN_CACHE_DIR, MOEGEN_PREBUILT_DIR)."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def ls_cmd(as_json):
    """List cached kernels: entry, backend, target, size, build time, layer."""
    try:
        kc = _cache()
        entries = sorted(kc.entries(), key=lambda e: (e.layer != "cache", e.name, e.created))
    except (MoegenError, OSError) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([_entry_dict(e) for e in entries], indent=1))
        return
    click.echo(f"cache: {kc.directory}{'' if kc.trusted else '  (private fallback)'}")
    if not entries:
        click.echo("no entries")
        return
    click.echo(table(("entry", "backend", "target", "size", "built", "layer"),
                     [(e.entry, e.backend, e.target, _size(e.size), _when(e.created), e.layer)
                      for e in entries], right=[3]))
    click.echo(f"{len(entries)} entries, {_size(sum(e.size for e in entries))}")


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def info_cmd(as_json):
    """Where the cache is, whether it is trusted, its layers and totals."""
    try:
        kc = _cache()
        entries = kc.entries()
        layers = []
        for root, problem in kc.layer_status():
            layers.append({"path": str(root), "problem": problem,
                           "entries": sum(e.layer == str(root) for e in entries)})
        writable = [e for e in entries if e.writable]
        info = {"directory": str(kc.directory), "requested": str(kc.requested_directory),
                "trusted": kc.trusted, "untrusted_reason": kc.untrusted_reason,
                "entries": len(writable), "size": sum(e.size for e in writable),
                "prebuilt": layers, "offline": settings.offline(),
                "always_compile": settings.always_compile()}
    except (MoegenError, OSError, ValueError) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"directory:       {info['directory']}")
    if not info["trusted"]:
        click.echo(f"requested:       {info['requested']} (refused: {info['untrusted_reason']})")
    click.echo(f"entries:         {info['entries']} ({_size(info['size'])})")
    for layer in layers:
        state = (f"refused: {layer['problem']}" if layer["problem"]
                 else f"{layer['entries']} entries")
        click.echo(f"prebuilt layer:  {layer['path']} ({state})")
    if not layers:
        click.echo("prebuilt layers: none (MOEGEN_PREBUILT_DIR)")
    click.echo(f"offline:         {info['offline']}")
    click.echo(f"always compile:  {info['always_compile']}")


def _short(value, width: int = 96) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


@cache.command("explain", context_settings={"ignore_unknown_options": True,
                                            "allow_extra_args": True})
@click.argument("spec_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def explain_cmd(spec_args, as_json):
    """Show what goes into a spec's cache key and which entry matches.

    SPEC_ARGS are the spec options of `moegen build` (e.g. --experts 8 --topk 2 --hidden 512),
    or one entry name as `moegen cache ls` prints it (or a spec name: every entry of it).
    """
    if len(spec_args) == 1 and not spec_args[0].startswith("-"):
        _explain_entry(spec_args[0], as_json)
        return
    try:
        spec = parse_spec_args(spec_args, "moegen cache explain")
        if spec is None:        # --help
            return
        parts = jit.key_parts(spec)
        key = digest(parts)
        kc = _cache()
        same_name = [e for e in kc.entries() if e.name == spec.name]
    except click.ClickException:
        raise
    except click.exceptions.Exit:
        return
    except (MoegenError, ValueError, TypeError, OSError) as exc:
        _fail(exc)
    match = [e for e in same_name if e.key == key]
    others = [e for e in same_name if e.key != key]
    if as_json:
        click.echo(json.dumps({"name": spec.name, "key": key, "entry": entry_name(spec.name, key),
                               "parts": parts, "cached_in": [e.layer for e in match],
                               "other_keys": [_entry_dict(e) for e in others]},
                              indent=1, default=str))
        return
    click.echo(f"spec:   {spec.name}")
    click.echo(f"key:    {key}")
    click.echo(f"entry:  {entry_name(spec.name, key)}")
    click.echo("key parts (sha256 over their canonical JSON):")
    for part in sorted(parts):
        value = parts[part]
        if part == "templates" and isinstance(value, dict):
            value = f"{len(value)} files, digest {digest(value)[:16]}"
        click.echo(f"  {part:<10} {_short(value)}")
    if match:
        for e in match:
            click.echo(f"cached: yes, in {e.layer} ({_size(e.size)}, built {_when(e.created)})")
    else:
        click.echo("cached: no (a compile would run; `moegen build` with these options "
                   "prebuilds it)")
    for e in others:
        diff = _meta_diff(e.meta, parts)
        click.echo(f"  other entry {e.entry} [{e.layer}] differs in: "
                   f"{diff or 'key parts not recorded'}")


def _explain_entry(name: str, as_json: bool) -> None:
    """The recorded build inputs of the entries called ``name`` (entry or spec name)."""
    try:
        found = [e for e in _cache().entries() if name in (e.entry, e.name)]
    except (MoegenError, OSError) as exc:
        _fail(exc)
    if not found:
        raise click.ClickException(f"no cache entry named {_short(name, 80)!r} "
                                   "(`moegen cache ls` lists the entries)")
    if as_json:
        click.echo(json.dumps([dict(_entry_dict(e), meta=e.meta) for e in found], indent=1,
                              default=str))
        return
    for e in found:
        click.echo(f"entry:  {e.entry} [{e.layer}]")
        click.echo(f"spec:   {e.name}")
        click.echo(f"key:    {e.key}")
        click.echo(f"size:   {_size(e.size)}, built {_when(e.created)}")
        click.echo("recorded build inputs:")
        for k in sorted(e.meta):
            if k != "created":
                click.echo(f"  {k:<14} {_short(e.meta[k])}")


def _meta_diff(meta: dict, parts: dict) -> str:
    """Which recorded inputs of another entry differ from this spec's key parts."""
    recorded = meta.get("key_parts")
    if isinstance(recorded, dict):
        return ", ".join(sorted(k for k in set(parts) | set(recorded)
                                if parts.get(k) != recorded.get(k)))
    pairs = (("target", "target"), ("toolchain", "toolchain"), ("options", "options"),
             ("moegen_version", "moegen"), ("backend", "backend"))
    return ", ".join(p for m, p in pairs if m in meta and p in parts and meta[m] != parts[p])


@cache.command("verify")
@click.option("--repair", is_flag=True, help="delete bad entries of the writable cache")
def verify_cmd(repair):
    """Check every entry's digest, name and ownership; exit 1 if any problem remains."""
    try:
        kc = _cache()
        problems = kc.verify(repair=repair)
        remaining = kc.verify() if repair and problems else problems
        n = len(kc.entries())
    except (MoegenError, OSError) as exc:
        _fail(exc)
    for p in problems:
        click.echo(str(p))
    if repair and problems:
        click.echo(f"repaired {len(problems) - len(remaining)} of {len(problems)} problems")
    if remaining:
        hint = "" if repair else "; `moegen cache verify --repair` deletes bad writable entries"
        raise click.ClickException(f"{len(remaining)} problem(s) in the kernel cache{hint}")
    click.echo(f"ok: {n} entries verified")


@cache.command("clear")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
def clear_cmd(yes):
    """Delete every entry of the writable cache (prebuilt layers are never touched)."""
    kc = _cache()
    if not yes:
        click.confirm(f"Delete every kernel in {kc.directory}?", abort=True)
    try:
        n = kc.clear()
    except (MoegenError, OSError) as exc:
        _fail(exc)
    click.echo(f"removed {n} entries from {kc.directory}")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"500M"``, ``"2GiB"``, ``"1.5g"`` or ``"1024"`` (powers of 1024)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise click.BadParameter(f"expected a size such as 500M or 2G, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


@cache.command("prune")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS",
              help="delete entries built more than DAYS days ago")
@click.option("--max-size", metavar="SIZE",
              help="then delete the oldest until at most SIZE remain (e.g. 2G)")
def prune_cmd(older_than, max_size):
    """Delete old entries of the writable cache."""
    if older_than is None and max_size is None:
        raise click.UsageError("give --older-than DAYS and/or --max-size SIZE")
    limit = parse_size(max_size) if max_size is not None else None
    try:
        kc = _cache()
        n = kc.prune(older_than=None if older_than is None else older_than * 86400,
                     max_size=limit)
    except (MoegenError, OSError) as exc:
        _fail(exc)
    click.echo(f"removed {n} entries from {kc.directory}")


@cache.command("export")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", "names", multiple=True,
              help="only this spec name or entry name (repeatable)")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path),
              metavar="KEYFILE", help="sign the manifest with this Ed25519 private key "
                                      "(`moegen keygen`)")
def export_cmd(archive, names, sign_key):
    """Write cached kernels to ARCHIVE (.tar.gz with a sha256 manifest)."""
    try:
        manifest = export_archive(_cache(), archive, names=list(names) or None, sign_key=sign_key)
    except (MoegenError, OSError) as exc:
        _fail(exc)
    click.echo(f"exported {len(manifest['entries'])} entries to {archive}"
               + (f", signed with {sign_key}" if sign_key else ""))


@cache.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prebuilt", "prebuilt_dir", type=click.Path(file_okay=False, path_type=Path),
              help="unpack as a read-only prebuilt layer here instead (for MOEGEN_PREBUILT_DIR)")
@click.option("--replace", is_flag=True, help="with --prebuilt: replace an existing layer")
@click.option("--verify", "pubkeys", multiple=True, metavar="PUBKEY",
              type=click.Path(dir_okay=False, path_type=Path),
              help="refuse the archive unless one of these public keys signed it (repeatable; "
                   "default: the keys of MOEGEN_TRUSTED_KEYS, if set)")
@click.option("--max-entry-size", default="2G", show_default=True, metavar="SIZE",
              help="refuse an archive with an entry larger than this")
@click.option("--max-total-size", default="16G", show_default=True, metavar="SIZE",
              help="refuse an archive whose entries are larger than this in all")
def import_cmd(archive, prebuilt_dir, replace, pubkeys, max_entry_size, max_total_size):
    """Check ARCHIVE completely, then add its kernels to the cache (or a prebuilt layer)."""
    from ..signing import load_public_key  # cryptography: ~50 ms, only for --verify
    limits = {"max_entry": parse_size(max_entry_size), "max_total": parse_size(max_total_size)}
    try:
        keys = [load_public_key(p) for p in pubkeys] or None
        if prebuilt_dir is not None:
            layer = extract_archive(archive, prebuilt_dir, replace=replace, keys=keys, **limits)
            n = len(list((layer / "entries").iterdir()))
            click.echo(f"unpacked {n} entries into {layer}; set MOEGEN_PREBUILT_DIR={layer}")
        else:
            kc = _cache()
            names = import_archive(archive, kc, keys=keys, **limits)
            click.echo(f"imported {len(names)} entries into {kc.directory}")
    except (MoegenError, OSError) as exc:
        _fail(exc)


@click.command("keygen")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def keygen(out):
    """Write a new Ed25519 signing key to OUT (mode 0600) and its public key to OUT.pub.

    Sign archives with `moegen cache export --sign OUT`; check them with `moegen cache import
    --verify OUT.pub` or MOEGEN_TRUSTED_KEYS=OUT.pub (prebuilt layers too).
    """
    from ..signing import keygen as write_keys  # cryptography: ~50 ms, only for keygen
    try:
        private, public = write_keys(out)
    except MoegenError as exc:
        _fail(exc)
    click.echo(f"private key: {private} (keep it secret)\npublic key:  {public}")
