"""The parity certificate: is the rescued student as good as the platform fine-tune it replaces?

    cert = build_certificate(CertificateInputs(...))        # flywheel.rescue builds the inputs
    json_path, html_path = write_certificate(cert, "rescue-out/")
    check = verify_certificate("rescue-out/certificate.json")   # recomputes every hash

Two paired comparisons, student against teacher:

* **on the imported eval** (its test split, its graders): the per-item objective scores paired, the
  one-sided paired bootstrap 95% lower bound of (student − teacher) against −margin — the
  non-inferiority test of flywheel.promotion (`non_inferior`), with per-grader differences and
  their 95% CIs from flywheel.stats;
* **on held-back traffic** (imported stored completions never trained on): no labels, so the
  teacher's stored reply is the reference; the student passes an input when its reply equals the
  teacher's (whitespace and case folded, flywheel.distill.vote's rule). Non-inferior when the Wilson
  95% lower bound of that agreement is at least 1 − margin.

Parity is shown only when every comparison made is non-inferior; otherwise the certificate says so
and what would help (more paired items, another base model, a margin chosen in advance). It carries
sha256 hashes of the eval spec, the data (eval data, training set, held-back traffic) and the
adapter, and a hash of its own body, so `flywheel rescue verify` can tell an edited file from a true
one. It ends with the commands that serve the student under the model name the app already sends.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel.errors import RescueError

VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GraderDiff(_Model):
    """One grader's paired difference (student − teacher) on the eval's items."""

    grader: str = Field(description="The grader's name in the eval spec.")
    n: int = Field(description="Paired items.")
    teacher: float | None = Field(description="The teacher's mean score.")
    student: float | None = Field(description="The student's mean score.")
    diff: float | None = Field(description="Mean of student − teacher.")
    ci_low: float | None = Field(description="Paired bootstrap 95% CI, low end.")
    ci_high: float | None = Field(description="Paired bootstrap 95% CI, high end.")


class EvalParity(_Model):
    """The paired comparison on the imported eval."""

    eval_name: str = Field(description="The eval spec's name.")
    split: str = Field(description="The split compared (held back from training).")
    n: int = Field(description="Paired items.")
    objective: str = Field(description="The objective grader.")
    teacher: float | None = Field(description="The teacher's objective mean.")
    student: float | None = Field(description="The student's objective mean.")
    diff: float | None = Field(description="Mean of student − teacher.")
    ci_low: float | None = Field(description="Two-sided paired bootstrap 95% CI, low end.")
    ci_high: float | None = Field(description="Two-sided paired bootstrap 95% CI, high end.")
    low_one_sided: float | None = Field(description="One-sided 95% lower bound (the non-inferiority test).")
    non_inferior: bool = Field(description="low_one_sided > −margin.")
    test: str = Field(description="The test and its figures, in words.")
    graders: list[GraderDiff] = Field(default_factory=list, description="Per-grader differences.")


class TrafficParity(_Model):
    """Agreement with the teacher's stored replies on held-back traffic."""

    n: int = Field(description="Held-back stored completions the student answered.")
    agreed: int = Field(description="How many replies equal the teacher's (folded).")
    agreement: float | None = Field(description="agreed / n.")
    ci_low: float | None = Field(description="Wilson 95% interval, low end.")
    ci_high: float | None = Field(description="Wilson 95% interval, high end.")
    non_inferior: bool = Field(description="ci_low >= 1 − margin.")


class Disagreement(_Model):
    """An item where the two sides differ (eval: pass/fail; traffic: the reply)."""

    where: str = Field(description="eval or traffic.")
    key: str = Field(description="The item key or the stored completion's id.")
    input: str = Field(description="The user's text.")
    teacher: str = Field(description="The teacher's reply.")
    student: str = Field(description="The student's reply.")


class SideCost(_Model):
    """Cost and latency of one side, measured on the eval's test items."""

    model: str = Field(description="The model reference.")
    usd_per_1k_requests: float = Field(description="USD per 1,000 requests of the measured size.")
    basis: str = Field(description="How the cost was computed.")
    latency_ms_mean: float | None = Field(default=None, description="Mean latency per request (ms).")
    latency_ms_p95: float | None = Field(default=None, description="95th percentile latency (ms).")
    prompt_tokens_mean: float = Field(default=0.0, description="Mean prompt tokens per request.")
    completion_tokens_mean: float = Field(default=0.0, description="Mean completion tokens per request.")


class HashedFile(_Model):
    """A file or folder the certificate vouches for."""

    role: str = Field(description="spec, eval data, training set, held-back traffic or adapter.")
    path: str = Field(description="Absolute path when the certificate was written.")
    sha256: str = Field(description="sha256 of the file (of a folder: its files' names and bytes).")


class Certificate(_Model):
    """The parity certificate (JSON beside its HTML page)."""

    version: int = Field(default=VERSION, description="Certificate format version.")
    created_at: str = Field(description="UTC ISO time it was written.")
    teacher: str = Field(description="The platform fine-tune (openai:ft:...).")
    student: str = Field(description="The local student with its adapter.")
    served_name: str = Field(description="The model name the app sends (the teacher's).")
    margin: float = Field(description="The non-inferiority margin the user chose.")
    eval: EvalParity = Field(description="On the imported eval.")
    traffic: TrafficParity | None = Field(default=None, description="On held-back traffic (if any was imported).")
    disagreements: list[Disagreement] = Field(default_factory=list, description="Where the two differ (first 50).")
    costs: dict[str, SideCost] = Field(description="teacher and student.")
    teacher_calls: int = Field(default=0, description="Teacher calls made (paid) by the rescue.")
    teacher_usd: float = Field(default=0.0, description="Their estimated cost.")
    training_rows: int = Field(default=0, description="Rows the student was trained on.")
    parity_shown: bool = Field(description="Every comparison made is non-inferior.")
    statement: str = Field(description="The verdict in one sentence.")
    advice: list[str] = Field(default_factory=list, description="What would help when parity was not shown.")
    commands: list[str] = Field(default_factory=list, description="How to serve and export the student.")
    hashes: list[HashedFile] = Field(default_factory=list, description="Files vouched for.")
    body_sha256: str = Field(default="", description="sha256 of this JSON without this field.")


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder as its sorted relative file names and bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(child.relative_to(path).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(child.read_bytes()).digest())
        return digest.hexdigest()
    try:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise RescueError(f"{path}: cannot hash: {exc.strerror or exc}") from None
    return digest.hexdigest()


def body_hash(cert: Certificate) -> str:
    """sha256 of the certificate's canonical JSON without `body_sha256`."""
    data = cert.model_dump(mode="json")
    data.pop("body_sha256", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# -- building ----------------------------------------------------------------------------------------
@dataclass
class CertificateInputs:
    """What the rescue measured; `build_certificate` turns it into the verdict."""

    teacher: str
    student: str
    served_name: str
    margin: float
    eval_parity: EvalParity
    traffic: TrafficParity | None
    disagreements: list[Disagreement]
    costs: dict[str, SideCost]
    files: list[tuple[str, str]]  # (role, path)
    teacher_calls: int = 0
    teacher_usd: float = 0.0
    training_rows: int = 0
    student_base: str = "local:smollm2"
    adapter_path: str | None = None
    extra_advice: list[str] = field(default_factory=list)


def _needed_n(n: int, width: float, margin: float) -> int:
    """Paired items for a CI of half-width ~margin, scaling the current width (1/sqrt(n))."""
    if n <= 0 or not width > 0 or margin <= 0:
        return 0
    return int(math.ceil(n * (width / margin) ** 2))


def build_certificate(inputs: CertificateInputs) -> Certificate:
    """The verdict, advice and way-out commands for measured comparisons."""
    from flywheel.store import now

    ev, traffic, margin = inputs.eval_parity, inputs.traffic, inputs.margin
    shown = ev.non_inferior and (traffic is None or traffic.non_inferior)
    advice = list(inputs.extra_advice)
    if shown:
        statement = (f"Parity shown: the student is non-inferior to {inputs.teacher} within a margin of {margin:g} "
                     f"on {ev.eval_name} ({ev.n} paired items, lower bound {ev.low_one_sided:+.3f})"
                     + (f" and agrees with it on {traffic.agreement:.1%} of {traffic.n} held-back requests" if traffic else "")
                     + ".")
    else:
        failed = []
        if not ev.non_inferior:
            failed.append(f"on {ev.eval_name} the one-sided 95% lower bound of student − teacher is "
                          f"{ev.low_one_sided:+.3f}, not above −{margin:g} ({ev.n} paired items)")
        if traffic is not None and not traffic.non_inferior:
            failed.append(f"on held-back traffic the student agrees with the teacher on {traffic.agreement:.1%} of "
                          f"{traffic.n} requests (95% lower bound {traffic.ci_low:.1%} < {1 - margin:.1%})")
        statement = "Parity NOT shown: " + "; ".join(failed) + "."
        half = (ev.ci_high - ev.ci_low) / 2
        if ev.n and half > margin / 2:
            advice.append(f"More data: the 95% CI is ±{half:.3f} wide on {ev.n} items; about "
                          f"{_needed_n(ev.n, half, margin / 2)} paired test items would narrow it to ±{margin / 2:.3f} "
                          "(import more stored completions and eval items).")
        if ev.ci_high < 0:
            advice.append(f"The student is significantly worse (CI [{ev.ci_low:+.3f}, {ev.ci_high:+.3f}]): train on "
                          f"more rows (it saw {inputs.training_rows}), or start from another base model than "
                          f"{inputs.student_base} (a larger local model or any HF folder: --student local:PATH).")
        elif not ev.non_inferior:
            advice.append("Another base model or more training rows may close the gap; the difference is not "
                          "significant either way.")
        if not ev.non_inferior and not math.isnan(ev.low_one_sided):
            advice.append(f"A margin: with --margin {max(-ev.low_one_sided, 0) + 0.005:.3f} this comparison would pass; "
                          "choose a margin your users accept before looking at results, not after.")
        if traffic is not None and not traffic.non_inferior:
            advice.append("Held-back traffic: exact agreement is strict for free-text replies; graders of your own "
                          "in the eval spec measure what matters better than equality.")
    name = inputs.served_name
    commands = [
        f"flywheel serve-model '{inputs.student}' --name '{name}' --port 8000",
        "export OPENAI_BASE_URL=http://127.0.0.1:8000/v1   # the app keeps sending model=" + name,
        f"flywheel export model '{inputs.student}' --merge -o student-merged   # a plain HF folder for vLLM / llama.cpp",
    ]
    hashes = [HashedFile(role=role, path=str(Path(path).resolve()), sha256=sha256_path(path))
              for role, path in inputs.files]
    if inputs.adapter_path:
        hashes.append(HashedFile(role="adapter", path=str(Path(inputs.adapter_path).resolve()),
                                 sha256=sha256_path(inputs.adapter_path)))
    cert = Certificate(created_at=now(), teacher=inputs.teacher, student=inputs.student, served_name=name,
                       margin=margin, eval=ev, traffic=traffic, disagreements=inputs.disagreements[:50],
                       costs=inputs.costs, teacher_calls=inputs.teacher_calls, teacher_usd=inputs.teacher_usd,
                       training_rows=inputs.training_rows, parity_shown=shown, statement=statement, advice=advice,
                       commands=commands, hashes=hashes)
    cert = Certificate.model_validate(_finite(cert.model_dump(mode="json")))  # NaN (no items) reads as null
    cert.body_sha256 = body_hash(cert)
    return cert


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


def render_certificate(cert: Certificate) -> str:
    """The certificate as one offline HTML page (no scripts, no network; every value escaped)."""
    from flywheel.report.html import templates_env

    return templates_env().get_template("certificate.html.j2").render(cert=cert)


def write_certificate(cert: Certificate, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `certificate.json` and `certificate.html` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "certificate.json", out / "certificate.html"
    json_path.write_text(json.dumps(cert.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    html_path.write_text(render_certificate(cert), encoding="utf-8")
    return json_path, html_path


# -- verifying ---------------------------------------------------------------------------------------
@dataclass
class HashCheck:
    role: str
    path: str
    ok: bool
    reason: str


@dataclass
class Verification:
    """`flywheel rescue verify`: the body hash and every file's hash, recomputed."""

    path: str
    parity_shown: bool
    body_ok: bool
    files: list[HashCheck]

    @property
    def ok(self) -> bool:
        return self.body_ok and all(f.ok for f in self.files)

    def summary_lines(self) -> list[str]:
        lines = [f"{self.path}: {'VERIFIED' if self.ok else 'NOT VERIFIED'} "
                 f"(parity {'shown' if self.parity_shown else 'NOT shown'})",
                 f"  certificate body: {'unchanged' if self.body_ok else 'EDITED since it was written'}"]
        lines += [f"  {f.role}: {'ok' if f.ok else f.reason}  {f.path}" for f in self.files]
        return lines


def load_certificate(path: str | Path) -> Certificate:
    """Read a certificate JSON; RescueError names the file and field when it is not one."""
    from pydantic import ValidationError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RescueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise RescueError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    try:
        return Certificate.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise RescueError(f"{path}: {where}: {first['msg']}") from None


def verify_certificate(path: str | Path) -> Verification:
    """Recompute the certificate's body hash and the hash of every file it names."""
    cert = load_certificate(path)
    checks = []
    for hashed in cert.hashes:
        target = Path(hashed.path)
        if not target.exists():
            checks.append(HashCheck(hashed.role, hashed.path, False, "MISSING"))
            continue
        actual = sha256_path(target)
        checks.append(HashCheck(hashed.role, hashed.path, actual == hashed.sha256,
                                "ok" if actual == hashed.sha256 else f"CHANGED (sha256 {actual[:12]}…, "
                                f"certified {hashed.sha256[:12]}…)"))
    return Verification(path=str(path), parity_shown=cert.parity_shown, body_ok=body_hash(cert) == cert.body_sha256,
                        files=checks)
