"""Payload encoding: one realistic train job's groups through msgspec, json and pickle.

    python bench/bench_payload.py            # 64 groups x 8 trajectories x 1,500 tokens
    python bench/bench_payload.py --quick    # 8 groups, fewer repeats: a smoke run

The payload is what ``backend.train`` puts under ``trainq:job:{id}:payload``:
a ``list[TrajectoryGroup]`` whose trajectories hold a system and a user
message and one sampled ``Choice`` (token ids, logprobs, the text), encoded by
``producer.validation.encode_groups`` (logprobs packed as float32). Each codec
encodes it and decodes it back; the table gives the bytes, throughput (MB/s of
that codec's own bytes), the median and p99 of encode+decode, and the time
against json's. Targets (bench/README.md): msgspec encode+decode at least 10x
faster than json, and no larger than pickle. Always exits 0.

json is stdlib ``json`` fed ``msgspec.to_builtins(groups)``, converted once
before timing: json is timed on plain dicts and lists and decodes to plain
dicts, with no schema check. msgspec decodes to typed, validated Structs, so
the comparison favours json. The "json, typed" row adds the conversions both
ways (``to_builtins`` before ``dumps``, ``msgspec.convert`` after ``loads``)
for the like-for-like cost.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import pickle
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from _common import machine_line, percentile

from producer.types import Choice, ChoiceMessage, ExceptionInfo, Trajectory, TrajectoryGroup
from producer.validation import encode_groups

GroupList = list[TrajectoryGroup]

VOCAB_SIZE = 151_936  # Qwen2.5's; token ids drawn uniformly, so most need 4 bytes as in real vocabularies
SPEED_TARGET = 10.0  # msgspec enc+dec at least this many times faster than json

WORDS = (
    "the agent calls search then reads the result and answers with a short plan "
    "for each step it checks the tool output before it writes the final reply"
).split()


# ----------------------------------------------------------------- the payload


def build_payload(n_groups: int, n_trajectories: int, n_tokens: int, seed: int = 0) -> GroupList:
    """Groups as a rollout farm sends them: per trajectory a system and a user message and one Choice."""
    rng = random.Random(seed)
    system = "You are a careful agent. Use the tools you are given and answer in plain text."
    groups = []
    for g in range(n_groups):
        user = f"Task {g}: " + " ".join(rng.choices(WORDS, k=60))
        trajectories = []
        for _ in range(n_trajectories):
            choice = Choice(
                token_ids=[rng.randrange(VOCAB_SIZE) for _ in range(n_tokens)],
                # Sampled tokens are mostly likely ones: logprobs cluster near 0. vLLM
                # computes them in float32, so they are float32 values, as here.
                logprobs=array.array("f", [-rng.expovariate(2.0) for _ in range(n_tokens)]).tolist(),
                # About four characters per token.
                message=ChoiceMessage(content=" ".join(rng.choices(WORDS, k=n_tokens * 4 // 5))),
                finish_reason="stop",
                sampled_step=7,
            )
            trajectories.append(
                Trajectory(
                    messages_and_choices=[{"role": "system", "content": system}, {"role": "user", "content": user}, choice],
                    reward=rng.random(),
                    metrics={"turns": 1.0, "tool_calls": float(rng.randrange(4))},
                    metadata={"task": g},
                )
            )
        groups.append(TrajectoryGroup(trajectories=trajectories, sampled_step=7))
    return groups


# ------------------------------------------- the wire format before array_like


class MapTrajectory(msgspec.Struct):
    """``Trajectory`` as it was encoded before it became ``array_like``: a map, field names in every record."""

    messages_and_choices: list[dict[str, Any] | Choice]
    reward: float = 0.0
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    logs: list[str] = msgspec.field(default_factory=list)


class MapGroup(msgspec.Struct):
    """``TrajectoryGroup`` as a map, as before."""

    trajectories: list[MapTrajectory]
    exceptions: list[ExceptionInfo] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    sampled_step: int | None = None


def to_map_records(groups: GroupList) -> list[MapGroup]:
    return [
        MapGroup(
            trajectories=[
                MapTrajectory(t.messages_and_choices, t.reward, t.metrics, t.metadata, t.tools, t.logs)
                for t in g.trajectories
            ],
            exceptions=g.exceptions,
            metadata=g.metadata,
            sampled_step=g.sampled_step,
        )
        for g in groups
    ]


def without_shared_strings(groups: GroupList) -> GroupList:
    """The same groups with no string object shared between trajectories (as after any decode)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(groups), type=GroupList)


# ------------------------------------------------------------------ the codecs


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    prepare: Callable[[GroupList], Any] = lambda groups: groups
    """Turns the groups into what ``encode`` takes, outside the timing."""


def build_codecs() -> list[Codec]:
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(GroupList)

    def json_typed_encode(groups: GroupList) -> bytes:
        return json.dumps(msgspec.to_builtins(groups)).encode()

    def json_typed_decode(data: bytes) -> GroupList:
        return msgspec.convert(json.loads(data), GroupList)

    return [
        # What producers and workers use: encode_groups (which validates as it packs the
        # logprobs as float32: more work than the other encoders do) and one typed
        # Decoder, made once and reused.
        Codec("msgspec msgpack, typed", encode_groups, decoder.decode),
        # The same records with logprobs as msgpack doubles, as before encode_groups.
        Codec("msgspec, float64 logprobs (before)", encoder.encode, decoder.decode),
        # The one-call form, schema-checked too: shows what reusing a Decoder saves.
        Codec(
            "msgspec msgpack, typed, one-call",
            encode_groups,
            lambda data: msgspec.msgpack.decode(data, type=GroupList),
        ),
        Codec(
            "json (stdlib) on to_builtins",
            lambda obj: json.dumps(obj).encode(),
            json.loads,
            prepare=msgspec.to_builtins,
        ),
        Codec("json (stdlib), typed", json_typed_encode, json_typed_decode),
        Codec("pickle (protocol 5)", lambda obj: pickle.dumps(obj, protocol=5), pickle.loads),
        # pickle writes a string object once and refers back to it; rollouts share
        # one prompt object across a group's trajectories, which pickle exploits.
        Codec(
            "pickle, no shared strings",
            lambda obj: pickle.dumps(obj, protocol=5),
            pickle.loads,
            prepare=without_shared_strings,
        ),
        # The same records encoded as maps, as producer/types/rollouts.py had them before array_like.
        Codec(
            "msgspec, map records (before)",
            encoder.encode,
            msgspec.msgpack.Decoder(list[MapGroup]).decode,
            prepare=to_map_records,
        ),
    ]


# ------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Result:
    name: str
    n_bytes: int
    encode_s: list[float]
    decode_s: list[float]

    @property
    def roundtrip_s(self) -> list[float]:
        return [e + d for e, d in zip(self.encode_s, self.decode_s)]


def measure_all(codecs: list[Codec], groups: GroupList, repeats: int) -> list[Result]:
    """Time every codec ``repeats`` times, interleaved round by round.

    Interleaving spreads whatever else the machine is doing evenly over the
    codecs, so their ratios hold up on a busy box even when absolute times do not.
    """
    objs = [codec.prepare(groups) for codec in codecs]
    sizes = []
    for codec, obj in zip(codecs, objs):  # also the warm-up round
        data = codec.encode(obj)
        check_roundtrip(codec, obj, codec.decode(data))
        sizes.append(len(data))
    timings: list[tuple[list[float], list[float]]] = [([], []) for _ in codecs]
    for _ in range(repeats):
        for codec, obj, (encode_s, decode_s) in zip(codecs, objs, timings):
            # Each round starts from a clean heap, as a worker does between jobs;
            # the garbage collector stays on, as it is in a worker.
            gc.collect()
            start = time.perf_counter()
            data = codec.encode(obj)
            middle = time.perf_counter()
            decoded = codec.decode(data)
            end = time.perf_counter()
            del decoded, data
            encode_s.append(middle - start)
            decode_s.append(end - middle)
    return [Result(c.name, n, e, d) for c, n, (e, d) in zip(codecs, sizes, timings)]


def check_roundtrip(codec: Codec, sent: Any, received: Any) -> None:
    # Decoded float32 logprobs are an array("f"), not the list sent: then the same bytes must come out.
    if received != sent and codec.encode(received) != codec.encode(sent):
        raise AssertionError(f"{codec.name}: the decoded payload differs from the encoded one")


# -------------------------------------------------------------------- report


def print_table(results: list[Result], baseline: str) -> None:
    base = statistics.median(next(r for r in results if r.name == baseline).roundtrip_s)
    header = (
        f"{'codec':<34} {'bytes':>12} {'enc MB/s':>9} {'dec MB/s':>9} "
        f"{'enc+dec ms':>11} {'p99 ms':>8} {'vs json':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        mb = r.n_bytes / 1e6
        roundtrip = statistics.median(r.roundtrip_s)
        print(
            f"{r.name:<34} {r.n_bytes:>12,} {mb / statistics.median(r.encode_s):>9,.0f} "
            f"{mb / statistics.median(r.decode_s):>9,.0f} {roundtrip * 1e3:>11.1f} "
            f"{percentile(r.roundtrip_s, 99) * 1e3:>8.1f} {base / roundtrip:>7.1f}x"
        )


def repeated_string_bytes(groups: GroupList) -> int:
    """msgpack bytes spent on message strings that are the same object as one sent earlier in the payload.

    pickle sends such a string once and refers back to it; msgpack has no
    references, so it sends each copy. This is the part of the size gap no
    msgpack encoding of the same records can close.
    """
    seen: set[int] = set()
    repeated = 0
    for group in groups:
        for trajectory in group.trajectories:
            for item in trajectory.messages_and_choices:
                if not isinstance(item, dict):
                    continue
                for value in item.values():
                    if isinstance(value, str):
                        if id(value) in seen:
                            repeated += len(msgspec.msgpack.encode(value))
                        seen.add(id(value))
    return repeated


def print_verdict(results: list[Result], groups: GroupList) -> None:
    by_name = {r.name: r for r in results}
    json_s = statistics.median(by_name["json (stdlib) on to_builtins"].roundtrip_s)
    print()
    for name in ("msgspec msgpack, typed", "msgspec, float64 logprobs (before)", "msgspec, map records (before)"):
        r = by_name[name]
        speedup = json_s / statistics.median(r.roundtrip_s)
        print(f"{name}:")
        print(
            f"  enc+dec >= {SPEED_TARGET:.0f}x faster than json: {speedup:.1f}x "
            f"-> {'met' if speedup >= SPEED_TARGET else 'MISSED'}"
        )
        for pickled in ("pickle (protocol 5)", "pickle, no shared strings"):
            other = by_name[pickled].n_bytes
            print(
                f"  bytes <= {pickled}: {r.n_bytes:,} vs {other:,} ({r.n_bytes / other - 1:+.2%}) "
                f"-> {'met' if r.n_bytes <= other else 'MISSED'}"
            )
    repeated = repeated_string_bytes(groups)
    typed = by_name["msgspec msgpack, typed"].n_bytes
    pickled = by_name["pickle (protocol 5)"].n_bytes
    print(
        f"message strings shared between trajectories, sent again by msgpack: {repeated:,} bytes; "
        f"without them msgspec would be {typed - repeated:,} vs pickle {pickled:,} "
        f"({(typed - repeated) / pickled - 1:+.2%})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 groups and 5 repeats: a smoke run")
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--trajectories", type=int, default=8, help="per group")
    parser.add_argument("--tokens", type=int, default=1500, help="sampled tokens per trajectory")
    parser.add_argument("--repeats", type=int, default=15, help="timed encode+decode rounds per codec")
    args = parser.parse_args(argv)
    if args.quick:
        args.groups, args.repeats = 8, 5

    groups = build_payload(args.groups, args.trajectories, args.tokens)
    n_tokens = args.groups * args.trajectories * args.tokens
    print(
        f"payload: {args.groups} groups x {args.trajectories} trajectories x {args.tokens} tokens "
        f"= {n_tokens:,} token ids + logprobs; {args.repeats} repeats; "
        f"msgspec {msgspec.__version__}"
    )
    print(machine_line())
    print()
    results = measure_all(build_codecs(), groups, args.repeats)
    print_table(results, baseline="json (stdlib) on to_builtins")
    print_verdict(results, groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
