"""The `safetypatch eval` job: a prompt file (`--prompts`) or a suite (`--suite`) on base and / or patched.

`evaluate(cfg)` runs the evaluation, records the certificate entry in the patch's patch.json when a patch was
evaluated, and returns the text the command prints (the CLI prints it; nothing is printed here).

`--backend vllm` generates with one vLLM engine (base = without the patch's LoRARequest, patched = with it;
`evals.backend.open_eval_backend`); suite entries that need log-likelihoods or KL are computed by the transformers
backend, loaded only when such an entry exists. With vLLM, a suite's summary.json has model_fingerprint null (vLLM's
weights are not in this process) and the patch's base fingerprint is not checked against the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..config import GenerationConfig, MODEL_HELP, check_numbers
from ..evals.backend import EVAL_BACKENDS, VLLM_DTYPES, BackendChoice, check_backend_choice
from ..data.templates import METADATA as TEMPLATE_FIELD
from ..data.templates import check_choice
from ..errors import ConfigError
from ..judges import DEFAULT_JUDGES
from ..modeling import check_device

if TYPE_CHECKING:
    from ..evals.prefill import PrefillSpec

# flags that only a suite run reads (refused with --prompts: they were silently ignored, and nothing recorded)
SUITE_ONLY = ("finetuned", "data_root", "db", "no_db", "judge_model", "name", "device")
# flags that only a prompt-file run reads (a suite names its own judges; its prefill attack is a `type: prefill` entry)
PROMPTS_ONLY = ("judges", "prompt_field", "prefill", "prefill_text", "prefill_source")


@dataclass
class EvalConfig:
    model: str = field(default="default", metadata={"help": MODEL_HELP})
    chat_template: str = field(default="auto", metadata=TEMPLATE_FIELD)
    patch: str | None = field(default=None, metadata={"help": "patch directory to evaluate"})
    with_base: bool = field(default=False, metadata={"help": "also evaluate the base model (with --patch)"})
    finetuned: str | None = field(default=None, metadata={
        "help": "with --suite: a fully fine-tuned model directory, evaluated against --model as its base (its rows "
                "are labelled 'patched')"})
    prompts: str | None = field(default=None, metadata={
        "help": "JSONL with a 'prompt' field, CSV with a 'prompt' column, or builtin:<harmful|benign>:<split> "
                "(default builtin:harmful:test)"})
    prompt_field: str = field(default="prompt", metadata={"help": "field / column holding the prompt"})
    out: str = field(default="", metadata={
        "help": "output directory for samples.jsonl and summary.json", "required": True})
    judges: str = field(default=",".join(DEFAULT_JUDGES), metadata={
        "help": "comma-separated judge names (refusal_whole reads the whole answer: a refusal opening followed by "
                "help is 'refused_then_complied', counted as compliance)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "default 64 (a suite: its own setting)", "min": 1})
    batch_size: int | None = field(default=None, metadata={
        "help": "default 16 (a suite: its own setting)", "min": 1})
    limit: int | None = field(default=None, metadata={
        "help": "evaluate only the first N prompts (a suite: at most N per entry)", "min": 1})
    suite: str | None = field(default=None, metadata={
        "help": "evaluation suite: a shipped name (quick, paper) or a YAML file; with --patch, base and patched "
                "are both evaluated"})
    data_root: str | None = field(default=None, metadata={
        "help": "directory of public benchmark files, laid out like ../shared/data (default $SAFETYPATCH_DATA)",
        "flags": ("--data-root", "--shared")})
    db: str | None = field(default=None, metadata={"help": "results database (default $SAFETYPATCH_HOME/results.db)"})
    no_db: bool = field(default=False, metadata={"help": "do not record the suite run in the results database"})
    judge_model: list[str] = field(default_factory=list, metadata={
        "help": "model for a model-based judge (repeatable); without JUDGE= it serves every model judge",
        "action": "append", "metavar": "[JUDGE=]MODEL"})
    name: str | None = field(default=None, metadata={
        "help": "run name in the results database (default: the --out directory's name)"})
    device: str | None = field(default=None, metadata={
        "help": "suite runs: device for the model and judge models, e.g. cuda (default CPU)"})
    resume: bool = field(default=False, metadata={"help": "allow writing into an existing output directory"})
    prefill: str | None = field(default=None, metadata={
        "help": "prompt-file runs: the prefilling attack as well: the answer starts with the first K tokens of a "
                "compliant answer (--prefill-source) and the continuation is judged; comma-separated K >= 0 "
                "(0, the plain request, is always included), e.g. 5,10,20,40", "metavar": "K[,K...]"})
    prefill_text: list[str] = field(default_factory=list, metadata={
        "help": "prompt-file runs: a fixed opening to prefill, e.g. 'Sure, here is' (repeatable; labelled opening_1, "
                "opening_2, ...)", "action": "append", "metavar": "TEXT"})
    prefill_source: str = field(default="base", metadata={
        "help": "where --prefill's compliant answers come from: base (the base model's own greedy answer; prompts "
                "it refuses are not attacked), a field of the prompt file, or file:PATH (JSONL / CSV with 'prompt' "
                "and 'response')", "metavar": "base|FIELD|file:PATH"})
    backend: str = field(default="transformers", metadata={
        "choices": EVAL_BACKENDS, "help": "what generates the answers: transformers (in this process), or vllm (one "
        "engine serves base and patched as a LoRA; on CPU run it from .venv-vllm, `make engines`)"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "--backend vllm: split the model over N devices (tensor parallelism)", "min": 1, "metavar": "N",
        "flags": ("--tensor-parallel",)})
    max_lora_rank: int | None = field(default=None, metadata={
        "help": "--backend vllm: the engine's max_lora_rank (default: the smallest vLLM accepts above the patch's "
                "rank)", "min": 1, "metavar": "R"})
    vllm_dtype: str = field(default="float32", metadata={
        "choices": VLLM_DTYPES, "help": "--backend vllm: the engine's weights dtype (float32, as the transformers "
                                        "backend loads them, so the two give the same answers)"})

    def validate(self, where: str = "config") -> None:
        """ConfigError, before any output exists or any model loads: numbers out of range, conflicting or ignored
        flags (`check_modes`), and for a prompt file, judges that are not registered or need a model (model
        judges run in suites, which take --judge-model)."""
        from ..judges import get_judge

        check_numbers(self, where)
        check_modes(self)
        check_choice(self.chat_template, where=where)
        if self.device is not None:
            check_device(self.device)
        check_backend_choice(self.backend_choice(), self.finetuned)
        self.prefill_spec()
        if not self.suite:
            for name in judge_names(self.judges):
                get_judge(name)  # ConfigError for an unknown name, JudgeError for a model judge without a model

    def prefill_spec(self) -> PrefillSpec | None:
        """--prefill / --prefill-text / --prefill-source as a PrefillSpec (None without an attack); ConfigError
        naming the flag for a bad value."""
        from ..evals.prefill import PrefillSpec, check_ks

        ks: list[int] = []
        if self.prefill is not None:
            parts = [x.strip() for x in self.prefill.split(",") if x.strip()]
            ks = check_ks([int(x) if x.lstrip("-").isdigit() else x for x in parts], "--prefill", ConfigError)
        if any(not t.strip() for t in self.prefill_text):
            raise ConfigError("--prefill-text: give a non-empty opening, e.g. --prefill-text 'Sure, here is'")
        if self.prefill_source != "base" and not any(k > 0 for k in ks):
            raise ConfigError(f"--prefill-source {self.prefill_source!r}: its answers are cut into --prefill K tokens; "
                              "give --prefill K[,K...] with a K >= 1 too, or drop --prefill-source")
        src = self.prefill_source.strip()
        if not src or (src.startswith("file:") and not Path(src[5:]).is_file()):
            raise ConfigError(f"--prefill-source {self.prefill_source!r}: give base, a field of the prompt file, or "
                              "file:PATH of an existing JSONL / CSV with compliant answers")
        if self.prefill is None and not self.prefill_text:
            return None
        return PrefillSpec(ks, list(self.prefill_text), src)

    def backend_choice(self) -> BackendChoice:
        return BackendChoice(self.backend, self.tensor_parallel_size, self.max_lora_rank, self.vllm_dtype)


def check_modes(cfg: EvalConfig) -> None:
    """ConfigError for --suite with --prompts, and for a flag the chosen mode would silently ignore."""
    if cfg.suite and cfg.prompts:
        raise ConfigError("give either --suite or --prompts, not both")
    if cfg.finetuned and not cfg.suite:
        raise ConfigError("--finetuned works with --suite (e.g. --suite quick)")
    defaults = EvalConfig(out=cfg.out)
    given = [f for f in (PROMPTS_ONLY if cfg.suite else SUITE_ONLY) if getattr(cfg, f) != getattr(defaults, f)]
    if not given:
        return
    flags = ", ".join("--" + f.replace("_", "-") for f in given)
    if cfg.suite:
        raise ConfigError(f"{flags}: apply to prompt-file runs (--prompts) only; a suite file names its own judges "
                          "and prompts; drop them")
    raise ConfigError(f"{flags}: apply to --suite runs only (a --prompts run would ignore them and record nothing "
                      "in the results database); drop them, or evaluate a suite (e.g. --suite quick)")


def judge_names(text: str) -> tuple[str, ...]:
    """`--judges` as a tuple of names; ConfigError when it names none."""
    names = tuple(j.strip() for j in text.split(",") if j.strip())
    if not names:
        raise ConfigError(f"--judges names no judge ({text!r}); give comma-separated names, e.g. refusal_xstest")
    return names


def judge_models(values: Sequence[str] | None) -> dict[str, str]:
    """`--judge-model` values as {judge name or '*': model spec}."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, spec = v.partition("=")
        if sep and name and spec and "/" not in name:
            out[name.strip()] = spec.strip()
        else:
            out["*"] = v.strip()
    return out


def evaluate(cfg: EvalConfig) -> str:
    """Run `safetypatch eval` and return the text it prints (the config is checked first: `EvalConfig.validate`)."""
    cfg.validate("eval")
    if cfg.suite:
        return _evaluate_suite(cfg)
    return _evaluate_prompts(cfg)


def _evaluate_suite(cfg: EvalConfig) -> str:
    from ..evals.suite import SuiteRunConfig, format_table
    from .suite import run_suite

    run_cfg = SuiteRunConfig(suite=cfg.suite or "", model=cfg.model, patch=cfg.patch, finetuned=cfg.finetuned,
                             data_root=cfg.data_root, db=cfg.db, record=not cfg.no_db,
                             judge_models=judge_models(cfg.judge_model), limit=cfg.limit,
                             max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, name=cfg.name,
                             device=cfg.device, chat_template=cfg.chat_template, backend=cfg.backend_choice())
    summary = run_suite(run_cfg, cfg.out, resume=cfg.resume)
    if cfg.patch:
        _certify_suite(cfg, summary)
        who, mode = f"{cfg.model} + patch {cfg.patch}", "base vs patched"
    elif cfg.finetuned:
        who, mode = f"{cfg.model} vs fine-tuned {cfg.finetuned}", "base vs fine-tuned ('patched' rows)"
    else:
        who, mode = cfg.model, "base only"
    lines = [f"suite {summary['suite']} on {who}: {mode}",
             format_table(summary["metrics"], kinds=summary["entries"])]
    lines += [f"note: {n}" for n in summary["notes"]]
    lines.append(f"rows: {Path(cfg.out) / 'samples.jsonl'}  summary: {Path(cfg.out) / 'summary.json'}  "
                 f"({summary['seconds']:.0f} s)")
    if summary["run_id"] is not None:
        lines.append(f"recorded as run {summary['run_id']} in {summary['db']}")
    return "\n".join(lines) + "\n"


def _certify_suite(cfg: EvalConfig, summary: dict[str, Any]) -> None:
    """The certificate: the first judge's plain refusal rate per benchmark, recorded in patch.json."""
    from ..patches import record_evaluation

    rates: dict[str, dict[str, float]] = {}
    for v in ("base", "patched"):
        for b, by_attack in summary["results"].get(v, {}).items():
            judges = summary["entries"].get(b, {}).get("judges") or []
            value = by_attack.get("none", {}).get(judges[0], {}).get("refusal_rate") if judges else None
            if value is not None:
                rates.setdefault(v, {})[b] = value
    record_evaluation(cfg.patch, {"suite": f"suite:{summary['suite']}", "run_id": summary["run_id"],
                                  "db": summary["db"], "out": str(cfg.out), "refusal": rates})


def _evaluate_prompts(cfg: EvalConfig) -> str:
    from ..evals.refusal import EvalRequest, run_eval

    prompts = cfg.prompts or "builtin:harmful:test"
    max_new_tokens = cfg.max_new_tokens or 64
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=cfg.batch_size or 16)
    judges = judge_names(cfg.judges)
    req = EvalRequest(model=cfg.model, patch=cfg.patch, with_base=cfg.with_base, prompts=prompts,
                      prompt_field=cfg.prompt_field, judges=judges, generation=gen, limit=cfg.limit,
                      chat_template=cfg.chat_template, backend=cfg.backend_choice(), prefill=cfg.prefill_spec())
    summary = run_eval(req, cfg.out, resume=cfg.resume)
    res = summary["results"]
    if cfg.patch:
        from ..patches import record_evaluation

        record_evaluation(cfg.patch, {
            "suite": f"prompts:{prompts}", "judges": list(judges), "n": summary["n_prompts"],
            "max_new_tokens": max_new_tokens, "out": str(cfg.out),
            "refusal": {n: {j: res[n][j] for j in judges} for n in ("base", "patched") if n in res}})
    return _refusal_table(summary, prompts, judges, cfg.out) + prefill_table(summary.get("prefill"), judges)


def _refusal_table(summary: dict[str, Any], prompts: str, judges: tuple[str, ...], out: str) -> str:
    res = summary["results"]
    names = [n for n in ("base", "patched") if n in res]
    lines = [f"{summary['n_prompts']} prompts from {prompts}; refusal rate by judge:",
             "judge".ljust(18) + "".join(n.rjust(10) for n in names)
             + ("  difference" if "difference" in res else "")]
    for j in judges:
        line = j.ljust(18) + "".join(f"{res[n][j]:>10.1%}" for n in names)
        if "difference" in res:
            line += f"  {res['difference'][j]:+.1%}"
        lines.append(line)
    for j in judges:  # whole-answer judges: the share refused, then complied (counted as compliance above)
        rtc = [res[n].get("refused_then_complied", {}).get(j) for n in names]
        if any(v is not None for v in rtc):
            lines.append(f"{j} RTC".ljust(18) + "".join(f"{v:>10.1%}" if v is not None else "-".rjust(10)
                                                        for v in rtc))
    lines.append(f"rows: {Path(out) / 'samples.jsonl'}  summary: {Path(out) / 'summary.json'}")
    return "\n".join(lines) + "\n"


def prefill_table(block: dict[str, Any] | None, judges: tuple[str, ...]) -> str:
    """The prefill attack's refusal rates: one line per attack (and worst case), one column per model, by
    `refusal_whole` when it is among the judges (it sees a refusal that breaks off mid-sentence), else the first
    judge ('' without an attack)."""
    if not block:
        return ""
    j = "refusal_whole" if "refusal_whole" in judges else judges[0]
    names = [n for n in ("base", "patched") if n in block["rates"]]
    lines = [f"prefill attack on {block['n_attacked']} of {block['n_prompts']} prompts (source {block['source']}); "
             f"refusal rate by {j} (continuation only):", "attack".ljust(18) + "".join(n.rjust(10) for n in names)]
    for label in block["rates"][names[0]] if names else []:
        cells = [block["rates"][n][label].get(j) for n in names]
        lines.append(label.ljust(18) + "".join("-".rjust(10) if c is None else f"{c:>10.1%}" for c in cells))
    lines += [f"note: {n}" for n in block["notes"]]
    return "\n".join(lines) + "\n"
