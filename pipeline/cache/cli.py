"""The cache's command line, `python -m pipeline.cache list|prune`: what it holds, and making it smaller.

Removing is safe beside running jobs: an entry is removed under the same per-key lock
the store's builders hold, is checked again under it (an entry rebuilt or used since the
scan is kept), and is renamed aside before it is deleted, so a job sees the whole entry
or none and rebuilds a missing one. Folders left by interrupted publishes are removed
only under their key's lock too, so the staging folder of a live build never is. Jobs
read an entry under the same lock, shared, so an entry is never removed between a job
finding it and linking it into its run folder.

"Last used" is the ctime of an entry's manifest: every run that uses an entry hard-links
its files into the run folder, which sets the ctime (removing such a run folder does
too). For the same reason, removing an entry frees at once only the files no run folder
still links; the rest is freed with the last run folder that links it.

It only touches what it can prove is the cache's own: the folder must hold the cache's
marker (`.pipeline-cache`), or, for a cache made before the marker existed, hold nothing
but stage folders (pipeline.layout.STAGES) of key-shaped names; anything else is refused
with one line and exit status 2 (`--cache outputs`, one level too high, deletes nothing).
Inside a cache it considers only stage folders and, in them, folders named by a key or
left by a publish of one (`.tmp-<key>-...`, `.trash-<key>-...`); other names stay.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.table import Table

from pipeline.cache import KEY, MARKER, STAGING_PREFIX, TRASH_PREFIX, StageCache
from pipeline.files import read_manifest
from pipeline.layout import MANIFEST, STAGES

# Names the cache itself writes in a stage folder: staging folders and entries moved aside
# (leftovers of interrupted publishes), and per-key locks.
LEFTOVER = re.compile(rf"(?:{re.escape(STAGING_PREFIX)}|{re.escape(TRASH_PREFIX)})({KEY.pattern})-[\w.-]+")
LOCK = re.compile(rf"\.{KEY.pattern}\.lock")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def default_cache() -> Path:
    """The pipeline's own default (paths.cache), relative to the current folder as in a run."""
    from pipeline.config import PathsConfig

    return Path(PathsConfig.cache.replace("${paths.outputs}", PathsConfig.outputs))


def parse_age(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: use a number and a unit s, m, h, d or w, "
                                         "e.g. 7d, 12h or 30m")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use a number and a unit B, KB, MB, GB, TB "
                                         "(or KiB, MiB, GiB, TiB), e.g. 5GB or 500MB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, span in (("w", AGE_UNITS["w"]), ("d", AGE_UNITS["d"]), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


@dataclass
class Item:
    """One folder under <cache>/<stage>/: a whole entry, a corrupt one, or a publish leftover."""

    stage: str
    key: str
    path: Path
    status: str  # ok | corrupt | leftover
    bytes: int
    unshared_bytes: int  # in files no run folder links: freed when the item is removed
    created: float
    last_used: float


def key_of(name: str) -> tuple[str, bool] | None:
    """(key, is a leftover) for the folder names the cache writes; None for any other name."""
    if KEY.fullmatch(name):
        return name, False
    match = LEFTOVER.fullmatch(name)
    return (match.group(1), True) if match else None


def not_a_cache(root: Path) -> str | None:
    """Why `root` is not provably a stage cache (None: it is, or it does not exist)."""
    if not root.exists() or StageCache(root).is_marked():
        return None
    if not root.is_dir():
        return f"{root} is not a folder"
    odd = []
    for path in sorted(root.iterdir()):
        if path.name not in STAGES or path.is_symlink() or not path.is_dir():
            odd.append(path.name)
            continue
        odd += [f"{path.name}/{p.name}" for p in sorted(path.iterdir())
                if not LOCK.fullmatch(p.name) and (key_of(p.name) is None or p.is_symlink() or not p.is_dir())]
    if not odd:
        return None  # a cache made before the marker: stage folders of key-shaped entries only
    shown = ", ".join(odd[:4]) + (f" and {len(odd) - 4} more" if len(odd) > 4 else "")
    return f"{root} is not a pipeline cache: it has no {MARKER} marker and holds {shown}, which a cache does not"


def inspect(stage: str, path: Path, verify: bool) -> Item | None:
    """The item at `path` now, or None if it is gone (or not a name the cache writes)."""
    known = key_of(path.name)
    if known is None:
        return None
    key, leftover = known
    if leftover:
        status = "leftover"
    else:
        status = "ok" if read_manifest(path, verify=verify) is not None else "corrupt"
    try:
        stamp = (path / MANIFEST).stat() if status == "ok" else path.stat()
        size = unshared = 0
        for file in path.rglob("*"):
            st = file.lstat()
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
                unshared += st.st_size if st.st_nlink == 1 else 0
    except FileNotFoundError:  # removed or published meanwhile
        return None
    return Item(stage, key, path, status, size, unshared, stamp.st_mtime, max(stamp.st_mtime, stamp.st_ctime))


def scan(root: Path, stage: str | None, verify: bool) -> list[Item]:
    """Entries and leftovers of the known stages (or of `stage`): nothing else is ever an item."""
    if not root.is_dir():
        return []
    items = []
    for folder in (root / name for name in ([stage] if stage else sorted(STAGES))):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_dir() and not path.is_symlink() and key_of(path.name) is not None:
                item = inspect(folder.name, path, verify)
                if item is not None:
                    items.append(item)
    return items


def list_cache(console: Console, root: Path, items: list[Item], entries: bool) -> None:
    if not items:
        console.print(f"cache {root}: empty")
        return
    now = time.time()
    if entries:
        table = Table(title=f"cache {root}", title_justify="left")
        for column in ("stage", "key", "size", "age", "last used", "status"):
            table.add_column(column, justify="right" if column in ("size", "age", "last used") else "left")
        for i in sorted(items, key=lambda i: (i.stage, -i.last_used)):
            table.add_row(i.stage, i.key[:12], decimal(i.bytes), age(now - i.created), age(now - i.last_used),
                          i.status)
        console.print(table)
    table = Table(title=None if entries else f"cache {root}", title_justify="left")
    for column in ("stage", "entries", "size", "oldest", "newest", "last used", "not whole"):
        table.add_column(column, justify="left" if column == "stage" else "right")

    def row(name: str, group: list[Item], **style) -> None:
        ok = [i for i in group if i.status == "ok"]
        table.add_row(name, str(len(ok)), decimal(sum(i.bytes for i in group)),
                      age(now - min(i.created for i in ok)) if ok else "-",
                      age(now - max(i.created for i in ok)) if ok else "-",
                      age(now - max(i.last_used for i in ok)) if ok else "-",
                      str(len(group) - len(ok)), **style)

    for stage in sorted({i.stage for i in items}):
        row(stage, [i for i in items if i.stage == stage])
    row("total", items, style="bold")
    console.print(table)
    broken = sum(i.status != "ok" for i in items)
    if broken:
        console.print(f"{broken} corrupt entr{'y' if broken == 1 else 'ies'} or leftover folder(s) of interrupted "
                      "publishes: `python -m pipeline.cache prune` removes them.")


def plan_prune(items: list[Item], older_than: float | None, max_size: int | None) -> list[tuple[Item, str]]:
    """What to remove and why: broken folders always, then by age, then least recently used."""
    now = time.time()
    plan = []
    for i in items:
        if i.status == "leftover":
            plan.append((i, "leftover of an interrupted publish"))
        elif i.status == "corrupt":
            plan.append((i, "corrupt: manifest missing or files do not match it"))
        elif older_than is not None and now - i.last_used > older_than:
            plan.append((i, f"not used for {age(now - i.last_used)}"))
    if max_size is not None:
        chosen = {id(i) for i, _ in plan}
        kept = sorted((i for i in items if id(i) not in chosen), key=lambda i: i.last_used)
        total = sum(i.bytes for i in kept)
        for i in kept:
            if total <= max_size:
                break
            plan.append((i, f"least recently used (over {decimal(max_size)})"))
            total -= i.bytes
    return plan


def still_wanted(planned: Item, now: Item | None) -> bool:
    """Under the key's lock: is the item still what the plan removes (not rebuilt, not used since)?"""
    if now is None:
        return False
    if planned.status == "ok":
        return now.status == "ok" and now.last_used == planned.last_used
    return now.status != "ok"


def remove(item: Item) -> None:
    """Rename aside first, so nobody ever sees half an entry; a crash here leaves a `.trash-` leftover."""
    trash = item.path
    if not item.path.name.startswith(TRASH_PREFIX):
        trash = item.path.with_name(f"{TRASH_PREFIX}{item.key}-{uuid.uuid4().hex[:8]}")
        os.rename(item.path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(console: Console, root: Path, items: list[Item], args) -> None:
    plan = plan_prune(items, args.older_than, args.max_size)
    store = StageCache(root)
    done: list[tuple[Item, str]] = []
    for item, reason in plan:
        if args.dry_run:
            done.append((item, reason))
            continue
        with console.status(escape(f"removing {item.stage}/{item.key[:12]} (waits for a job building it)")), \
                store.lock(item.stage, item.key):
            now = inspect(item.stage, item.path, args.verify)
            if not still_wanted(item, now):
                continue
            remove(now)
            done.append((now, reason))
    verb = "would remove" if args.dry_run else "removed"
    if done:
        table = Table(title=f"{verb} from {root}", title_justify="left")
        for column in ("stage", "key", "size", "reason"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for i, reason in done:
            table.add_row(i.stage, i.key[:12], decimal(i.bytes), reason)
        console.print(table)
    total = sum(i.bytes for i, _ in done)
    unshared = sum(i.unshared_bytes for i, _ in done)
    linked = f"; {decimal(total - unshared)} of it stays on disk while run folders link it" if total > unshared else ""
    console.print(f"{verb} {len(done)} folder(s), {decimal(total)}"
                  f" ({'would free' if args.dry_run else 'freed'} {decimal(unshared)}{linked})")
    skipped = len(plan) - len(done)
    if skipped:
        console.print(f"kept {skipped} folder(s) that a running job rebuilt or used meanwhile")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like the pipeline's own errors (argparse would add its usage text)."""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="python -m pipeline.cache", description="List or prune the pipeline's stage cache.")
    commands = top.add_subparsers(dest="command", required=True, metavar="{list,prune}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache", type=Path, default=None,
                        help="the cache folder (default: paths.cache of the pipeline, outputs/cache)")
    common.add_argument("--stage", help="only this stage (export, lower, ...)")
    common.add_argument("--verify", action="store_true",
                        help="also check every file's sha256 against its manifest (reads the whole cache)")
    ls = commands.add_parser("list", parents=[common], help="entries, sizes and ages per stage",
                             description="Entries, sizes and ages per stage (ages like 3d: since created or last used).")
    ls.add_argument("--entries", action="store_true", help="one row per entry too")
    what = "remove corrupt entries and leftovers of interrupted publishes, then old or least recently used entries"
    pr = commands.add_parser("prune", parents=[common], help=what, description=what[0].upper() + what[1:] + ".")
    pr.add_argument("--older-than", type=parse_age, metavar="AGE",
                    help="remove entries not used for longer than AGE (7d, 12h, 30m)")
    pr.add_argument("--max-size", type=parse_size, metavar="SIZE",
                    help="then remove least recently used entries until the cache fits SIZE (5GB, 500MB)")
    pr.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    root = (args.cache or default_cache()).resolve()
    if args.stage and args.stage not in STAGES:
        parser().error(f"argument --stage: {args.stage!r} is not a stage name (one of {', '.join(STAGES)})")
    problem = not_a_cache(root)
    if problem:
        print(f"error: {problem}. Fix: point --cache at the cache folder itself (paths.cache, e.g. outputs/cache); "
              "nothing was removed.", file=sys.stderr)
        sys.exit(2)
    # No markup: every line holds paths and folder names, printed as they are (brackets included).
    console = Console(highlight=False, soft_wrap=True, markup=False)
    items = scan(root, args.stage, args.verify)
    if args.command == "list":
        list_cache(console, root, items, args.entries)
    else:
        prune(console, root, items, args)


if __name__ == "__main__":
    main()
