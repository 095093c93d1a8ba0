"""``edgenode demo``: a whole gate in one command.

It creates a demo site (keys, a roster, statuses, signed snapshots), mints codes for a cast of
people, some of them with mismatched, expired, red, forged or screenshot codes, renders gate
footage of them showing their phones, runs the main job on it and prints each verdict beside
what was expected of it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import base45
from nacl.signing import SigningKey

from edgenode.cache import Cache, import_snapshot
from edgenode.cli_output import format_verdict_line, verdict_json
from edgenode.codes import (
    PREFIX,
    Colour,
    Rejection,
    Role,
    encode_community,
    encode_health,
    parse_payload,
)
from edgenode.config import load_config
from edgenode.decoders import create_decoder
from edgenode.demo.render import Effects, Presentation, PresentationSpan, render_gate_video
from edgenode.district import KEY_FILES, read_key
from edgenode.district_cli import DAY_S, create_site, site_records
from edgenode.i18n import N_, Translator
from edgenode.journal import Journal
from edgenode.pipeline import Gate, VerdictEvent, scan_files
from edgenode.snapshot import write_snapshot
from sync.identity import ensure_device_key

MARKER = ".edgenode-demo"
SITE = "XH-0012"
RESIDENTS = 200


@dataclass(frozen=True, slots=True)
class Person:
    label: str
    expected: str
    presentation: Presentation


@dataclass(slots=True)
class _Minter:
    health_key: SigningKey
    community_key: SigningKey
    roster: list[dict[str, Any]]
    now: int

    def health(self, index: int, colour: Colour = Colour.GREEN, **kwargs: Any) -> str:
        person = self.roster[index]
        options: dict[str, Any] = {"issued_at": self.now, "expires_at": self.now + DAY_S}
        options.update(kwargs)
        return encode_health(
            self.health_key,
            subject=bytes.fromhex(person["health_subject"]),
            colour=colour,
            **options,
        )

    def community(self, index: int, **kwargs: Any) -> str:
        person = self.roster[index]
        options: dict[str, Any] = {"issued_at": self.now, "expires_at": self.now + DAY_S}
        options.update(kwargs)
        return encode_community(
            self.community_key,
            subject=bytes.fromhex(person["subject"]),
            role=Role(person["role"]),
            compound=SITE,
            building=person["building"],
            unit=person["unit"],
            **options,
        )

    def index_of_role(self, role: Role, skip: int = 0) -> int:
        matches = [i for i, person in enumerate(self.roster) if person["role"] == role.value]
        return matches[skip % len(matches)]


def _forge(code: str) -> str:
    """Change a health code's colour byte to green without re-signing it."""
    body = bytearray(base45.b45decode(code[len(PREFIX) :]))
    body[39] = Colour.GREEN
    return PREFIX + str(base45.b45encode(bytes(body)).decode("ascii"))


def _cast(minter: _Minter, people: int) -> tuple[list[Person], list[dict[str, Any]]]:
    """Build the people in the footage and the snapshot records their story needs."""
    residents = [i for i, p in enumerate(minter.roster) if p["role"] == Role.RESIDENT.value]
    month_ago = minter.now - 30 * DAY_S
    revoked_printed = minter.community(
        residents[5], printed=True, issued_at=month_ago, expires_at=month_ago + 180 * DAY_S
    )
    first = (minter.health(residents[0]), minter.community(residents[0]))
    stories: list[Callable[[], Person]] = [
        lambda: Person(N_("resident, green code"), "admit", Presentation(first)),
        lambda: Person(
            N_("resident, yellow code drawn in yellow"),
            "review",
            Presentation(
                (minter.health(residents[1], Colour.YELLOW), minter.community(residents[1])),
                Effects(colour="yellow"),
            ),
        ),
        lambda: Person(
            N_("red health code"),
            "deny",
            Presentation(
                (minter.health(residents[2], Colour.RED), minter.community(residents[2])),
                Effects(colour="red", blur=0.3),
            ),
        ),
        lambda: Person(
            N_("codes of two different people"),
            "deny",
            Presentation((minter.health(residents[3]), minter.community(residents[4]))),
        ),
        lambda: Person(
            N_("forged: red code edited to green"),
            "deny",
            Presentation(
                (_forge(minter.health(residents[6], Colour.RED)), minter.community(residents[6])),
                Effects(colour="green"),
            ),
        ),
        lambda: Person(
            N_("screenshot of a dynamic code"),
            "deny",
            Presentation(
                (
                    minter.health(residents[7], issued_at=minter.now - 900),
                    minter.community(residents[7]),
                ),
                Effects(perspective=0.5),
            ),
        ),
        lambda: Person(
            N_("expired community code"),
            "deny",
            Presentation(
                (
                    minter.health(residents[8]),
                    minter.community(
                        residents[8],
                        printed=True,
                        issued_at=month_ago,
                        expires_at=minter.now - DAY_S,
                    ),
                )
            ),
        ),
        lambda: Person(
            N_("elderly resident with printed codes"),
            "admit",
            Presentation(
                (
                    minter.health(
                        residents[9],
                        printed=True,
                        issued_at=month_ago,
                        expires_at=month_ago + 180 * DAY_S,
                    ),
                    minter.community(
                        residents[9],
                        printed=True,
                        issued_at=month_ago,
                        expires_at=month_ago + 180 * DAY_S,
                    ),
                )
            ),
        ),
        lambda: Person(
            N_("dark mode, tilted phone"),
            "admit",
            Presentation(
                (minter.health(residents[10]), minter.community(residents[10])),
                Effects(dark_mode=True, perspective=0.4, rotation_deg=8),
            ),
        ),
        lambda: Person(
            N_("revoked printed community code"),
            "deny",
            Presentation((minter.health(residents[5]), revoked_printed)),
        ),
        lambda: Person(
            N_("status turned red after the code was issued"),
            "deny",
            Presentation(
                (minter.health(residents[11]), minter.community(residents[11])),
                Effects(colour="green", glare=0.5),
            ),
        ),
        lambda: Person(
            N_("visitor"),
            "review",
            Presentation(
                (
                    minter.health(minter.index_of_role(Role.VISITOR)),
                    minter.community(minter.index_of_role(Role.VISITOR)),
                )
            ),
        ),
        lambda: Person(N_("the first person's codes shown again"), "deny", Presentation(first)),
        lambda: Person(
            N_("health code only"),
            "incomplete",
            Presentation((minter.health(residents[12]),), duration_s=1.2),
        ),
        lambda: Person(
            N_("a QR code that is not a gate code"),
            "unrecognised",
            Presentation(("HTTPS://EXAMPLE.COM/MENU/TABLE-12",)),
        ),
        lambda: Person(
            N_("delivery rider"),
            "review",
            Presentation(
                (
                    minter.health(minter.index_of_role(Role.DELIVERY)),
                    minter.community(minter.index_of_role(Role.DELIVERY)),
                )
            ),
        ),
    ]
    cast = [story() for story in stories]
    # Fill up with ordinary residents under changing conditions.
    extra_effects = (
        Effects(perspective=0.5, blur=0.2),
        Effects(glare=0.4, colour="green"),
        Effects(dark_mode=True),
        Effects(rotation_deg=-10, blur=0.3),
    )
    for n in range(max(0, people - len(cast))):
        index = residents[20 + n]
        cast.append(
            Person(
                N_("resident, green code"),
                "admit",
                Presentation(
                    (minter.health(index), minter.community(index)),
                    extra_effects[n % len(extra_effects)],
                ),
            )
        )
    extra_records = [
        {"dataset": "revocations", "code_id": _code_id(revoked_printed), "revoked_at": minter.now},
        {
            "dataset": "health_status",
            "subject": minter.roster[residents[11]]["health_subject"],
            "colour": "red",
            "as_of": minter.now + 1,
        },
    ]
    return cast[: max(people, 1)], extra_records


def _code_id(text: str) -> str:
    code = parse_payload(text.encode("ascii"))
    if isinstance(code, Rejection):
        raise ValueError(f"demo minted an invalid code: {code.reason}")
    return code.code_id.hex()


def _prepare_folder(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise FileExistsError(
                f"{folder} is not empty and was not made by 'edgenode demo'; choose another --dir"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by edgenode demo; deleted and rebuilt on each run\n")


def run_demo(folder: Path, *, people: int, tr: Translator, json_output: bool) -> int:
    """Build the demo site, render footage, scan it and print verdicts. Returns an exit code."""
    _prepare_folder(folder)
    now = int(time.time())
    say = (lambda text: None) if json_output else print
    create_site(folder, site=SITE, residents=RESIDENTS, now=now)
    say(
        tr.gettext("Demo site {site}: {residents} residents, keys and snapshot in {folder}").format(
            site=SITE, residents=RESIDENTS, folder=folder
        )
    )

    config = load_config(folder / "edgenode.toml")
    # The device identity that signs uplink batches, as 'edgenode init' creates it.
    ensure_device_key(config.device_key_path)
    keys = {role: read_key(folder / name) for role, name in KEY_FILES.items()}
    roster = json.loads((folder / "roster.json").read_text(encoding="utf-8"))
    minter = _Minter(keys["health"], keys["community"], roster, now)
    cast, extra_records = _cast(minter, people)

    # The second snapshot adds a revocation and a newer red status, as a district update would.
    snapshot = folder / "snapshot-v2.ensnap"
    updated = {r["subject"] for r in extra_records if r["dataset"] == "health_status"}
    records = [
        record
        for record in site_records(keys, roster, SITE, now)
        if not (record["dataset"] == "health_status" and record["subject"] in updated)
    ]
    write_snapshot(
        snapshot,
        [*records, *extra_records],
        site=SITE,
        version=2,
        issued_at=now - 60,
        valid_until=now + 7 * DAY_S,
        signing_key=keys["district"],
    )
    import_snapshot(config.cache_path, snapshot, config.trust.district_key_bytes(), site=SITE)

    video = folder / "gate-footage.avi"
    started = time.perf_counter()
    info = render_gate_video([person.presentation for person in cast], video, seed=now % 1000)
    say(
        tr.gettext(
            "Rendered {seconds:.0f} s of gate footage ({people} people) in {elapsed:.1f} s: {path}"
        ).format(
            seconds=info.frame_count / info.fps,
            people=len(cast),
            elapsed=time.perf_counter() - started,
            path=video,
        )
    )

    events: list[VerdictEvent] = []
    with (
        Cache(config.cache_path) as cache,
        Journal(config.journal_path, config.device.id) as journal,
    ):
        gate = Gate(config, cache, journal, create_decoder(config.decoder.backend))
        scan_files(gate, [video], lambda event, _path: events.append(event))
        problems = journal.verify()

    matched = 0
    for event in events:
        person_index = _person_at(info.spans, event.source_time_s)
        person = cast[person_index] if person_index is not None else None
        ok = person is not None and person.expected == event.verdict.outcome.value
        matched += ok
        if json_output:
            row = verdict_json(event, str(video), tr)
            row["person"] = person_index
            row["expected"] = None if person is None else person.expected
            print(json.dumps(row, ensure_ascii=False, sort_keys=True))
            continue
        label = tr.gettext(person.label) if person else "?"
        number = "?" if person_index is None else str(person_index + 1)
        who = tr.gettext("Person {number} ({label})").format(number=number, label=label)
        mark = "✓" if ok else "✗"
        print(f"{mark} {who}: {format_verdict_line(event, tr)}")

    latencies = [event.record.latency_ms or 0.0 for event in events]
    if not json_output:
        _print_summary(events, matched, len(cast), latencies, problems == [], tr)
    return 0 if matched == len(events) == len(cast) and not problems else 1


def _person_at(spans: Sequence[PresentationSpan], at: float) -> int | None:
    """Return the index of the presentation a verdict belongs to: the last one started by then."""
    index = None
    for i, span in enumerate(spans):
        if span.start_s <= at + 1e-6:
            index = i
    return index


def _print_summary(
    events: list[VerdictEvent],
    matched: int,
    people: int,
    latencies: list[float],
    chain_ok: bool,
    tr: Translator,
) -> None:
    counts: dict[str, int] = {}
    for event in events:
        counts[event.verdict.outcome.value] = counts.get(event.verdict.outcome.value, 0) + 1
    print()
    print(
        tr.gettext(
            "Summary: {verdicts} verdicts for {people} people, {matched} as expected"
        ).format(verdicts=len(events), people=people, matched=matched)
    )
    print("  " + ", ".join(f"{name} {count}" for name, count in sorted(counts.items())))
    if latencies:
        p50 = statistics.median(latencies)
        p_max = max(latencies)
        print(
            tr.gettext(
                "Latency from frame to recorded verdict: median {p50:.1f} ms, max {max:.1f} ms"
            ).format(p50=p50, max=p_max)
        )
    chain = tr.gettext("intact") if chain_ok else tr.gettext("BROKEN")
    print(tr.gettext("Journal hash chain: {state}").format(state=chain))
