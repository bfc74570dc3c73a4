"""Every bad flag combination: exit status 2 and exactly one line on stderr, naming the command and the flag.

The table covers each command: unknown commands and options, bad enum values,
missing values and arguments, bad integers, conflicting flags, missing and
broken manifests and perf tables, bad allowlist prefixes, requests the model
refuses.  Nothing prints a traceback or click's multi-line usage block.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from registry.vocab import Op

ROOT = pathlib.Path(__file__).resolve().parents[3]
E = ["explain", "--op", "mha_decode", "--arch", "sm_90"]
ONE_OF_OPS = re.escape(", ".join(Op.values()))

BAD = [
    # (argv, the one line on stderr after "kernelsel COMMAND: ")
    ([], r"kernelsel: give a command: .*explain"),
    (["explian"], r"kernelsel: no such command 'explian' \(did you mean 'explain'\?\); commands: "),
    (["--bogus"], r"kernelsel: no such option --bogus"),
    (["explain"], r"kernelsel explain: --op: required"),
    (["explain", "--op"], r"kernelsel explain: --op: needs a value"),
    (["explain", "--op", "mla_decod"], rf"kernelsel explain: --op: 'mla_decod' is not one of {ONE_OF_OPS} \(did you mean 'mla_decode'\?\)"),
    (E + ["--q-dtype", "bf17"], r"kernelsel explain: --q-dtype: 'bf17' is not a dtype; expected one of bf16, .* \(did you mean 'bf16'\?\)"),
    (E + ["--kv-dtype", ""], r"kernelsel explain: --kv-dtype: '' is not a dtype; expected one of bf16"),
    (["explain", "--op", "mha_decode", "--arch", "sm_95"], r"kernelsel explain: --arch: 'sm_95' is not an SM like sm_90; expected one of sm_70, .*\(did you mean 'sm_90'\?\)"),
    (["explain", "--op", "mha_decode", "--arch", "{digits}"], r"kernelsel explain: --arch: '9+\.\.\. is not an SM like sm_90"),
    (E + ["--head-dim", "abc"], r"kernelsel explain: --head-dim: 'abc' is not a valid integer"),
    (E + ["--head-dim", "0"], r"kernelsel explain: --head-dim: must be >= 1, got 0"),
    (E + ["--head-dim", "9" * 30], r"kernelsel explain: --head-dim: must be <= 9223372036854775807, got 9+"),
    (E + ["--head-dim"], r"kernelsel explain: --head-dim: needs a value"),
    (E + ["--q-dtyp", "bf16"], r"kernelsel explain: no such option --q-dtyp \(did you mean --q-dtype\?\)"),
    (E + ["extra"], r"kernelsel explain: got unexpected extra argument \(extra\)"),
    (E + ["--solution", "flashinfr"], r"kernelsel explain: --solution: 'flashinfr' is not one of flashinfer, .* \(did you mean 'flashinfer'\?\)"),
    (E + ["--backend", "fa9"], r"kernelsel explain: --backend: 'fa9' is not one of fa2, .*"),
    (E + ["--kernel", "nope"], r"kernelsel explain: .*no kernel named 'nope'; kernels for mha_decode: "),
    (E + ["--kernel", "triton-mla-decode"], r"kernelsel explain: .*'triton-mla-decode' implements mla_decode, not mha_decode"),
    (E + ["--num-qo-heads", "3", "--num-kv-heads", "2"], r"kernelsel explain: --num-qo-heads: num_qo_heads 3 is not a multiple of num_kv_heads 2"),
    (E + ["--kv-lora-rank", "512"], r"kernelsel explain: --kv-lora-rank: kv_lora_rank means nothing for op mha_decode; it takes: "),
    (["explain", "--op", "mha_extend", "--arch", "sm_90", "--q-len", "2"], r"kernelsel explain: --q-len: q_len 2 means nothing for op mha_extend"),
    (E + ["--batch-size", "0", "--kv-len", "-1"], r"kernelsel explain: --batch-size: must be >= 1, got 0; --kv-len: must be >= 1, got -1"),
    (E + ["--new-len", "4"], r"kernelsel explain: --new-len: new_len means nothing for op mha_decode \(a decode step's new tokens per request are q_len\)"),
    (["explain", "--op", "mha_extend", "--arch", "sm_90", "--new-len", "0"], r"kernelsel explain: --new-len: must be >= 1, got 0"),
    (E + ["--manifest", "{missing}"], r"kernelsel explain: --manifest: .*missing\.yaml: cannot read manifest: No such file or directory"),
    (E + ["--manifest", "{dir}"], r"kernelsel explain: --manifest: .*is a directory"),
    (E + ["--manifest", "{dup}"], r"kernelsel explain: --manifest: .*dup\.yaml:2:1: \(top level\): duplicate key 'schema_version' \(first at line 1\)"),
    (E + ["--manifest", "{broken}"], r"kernelsel explain: --manifest: .*broken\.yaml:\d+:\d+: kernels\[0\]\.op: .* \(and 1 more problem; `kernelsel validate` lists them all\)"),
    (E + ["--manifest", "{binary}"], r"kernelsel explain: --manifest: .*binary\.yaml:1:\d+: not UTF-8: byte 0xff"),
    (E + ["--manifest", ""], r"kernelsel explain: --manifest: an empty path; leave the option out for the default$"),
    (E + ["--perf", " "], r"kernelsel explain: --perf: an empty path; leave the option out for the default$"),
    (E + ["--perf", "{missing}"], r"kernelsel explain: --perf: .*missing\.yaml: cannot read perf table: No such file or directory"),
    (E + ["--perf", "{badperf}"], r"kernelsel explain: --perf: .*badperf\.yaml:4:\d+: entries\[0\]\.shape\.q_dtype: 'bf17' is not one of"),
    (E + ["--perf", "{unknownperf}"], r"kernelsel explain: --perf: .*unknownperf\.yaml:5:\d+: entries\[0\]\.median_us\.triton-mha-decod: "
                                      r"no kernel named 'triton-mha-decod' in kernels\.yaml \(did you mean 'triton-mha-decode'\?\) "
                                      r"\(and 1 more problem; `kernelsel validate --perf \S+unknownperf\.yaml` lists them all\)$"),
    (["explain", "--op", "mha_decode", "--arch", "sm_100", "--perf", "perf/nvidia-h200-sm_90.yaml"],
     r"kernelsel explain: --perf: perf/nvidia-h200-sm_90\.yaml was recorded on sm_90 \(NVIDIA H200\), the request is for "
     r"sm_100: give a table recorded on sm_100, or leave --perf out$"),
    (E + ["--allow-adapter", "os"], r"kernelsel explain: --allow-adapter: 'os' is in the standard library"),
    (E + ["--allow-adapter", "a/b"], r"kernelsel explain: --allow-adapter: 'a/b' is not a module prefix like mycompany\.kernels"),
    (["plan", "--op", "mha_decode"], r"kernelsel plan: no such option --op"),
    (["plan", "--arch", "sm_95"], r"kernelsel plan: --arch: 'sm_95' is not an SM"),
    (["plan", "--arch", "sm_90", "--q-dtype", "int8"], r"kernelsel plan: --q-dtype: 'int8' is not a dtype"),
    (["plan", "--arch", "sm_90", "--kernel", "triton-mla-decode"], r"kernelsel plan: --kernel: 'triton-mla-decode' is not an "
                                                                   r"mha_prefill \(postwrite\) or mha_extend \(prewrite\) kernel; one of: "),
    (["plan", "--arch", "sm_90", "--q-dtype", "fp8", "--kernel", "flashinfer-fa3-prefill"],
     r"kernelsel plan: --kernel: 'flashinfer-fa3-prefill' runs postwrite, but FP8 attention .* always prewrites"),
    (["list", "--op", "x"], rf"kernelsel list: --op: 'x' is not one of {ONE_OF_OPS}"),
    (["list", "extra"], r"kernelsel list: got unexpected extra argument \(extra\)"),
    (["list", "--manifest", "{missing}"], r"kernelsel list: --manifest: .*cannot read manifest"),
    (["show"], r"kernelsel show: NAME: missing argument"),
    (["show", "triton-mla-decod"], r"kernelsel show: no kernel named 'triton-mla-decod' \(did you mean 'triton-mla-decode'\?\)"),
    (["show", "a", "b"], r"kernelsel show: got unexpected extra argument \(b\)"),
    (["validate", "{missing}"], r"kernelsel validate: PATH: .*missing\.yaml' does not exist"),
    (["validate", "{dir}"], r"kernelsel validate: PATH: .* is a directory"),
    (["validate", ""], r"kernelsel validate: PATH: an empty path; give a file$"),
    (["validate", "--allow-adapter", "builtins"], r"kernelsel validate: --allow-adapter: 'builtins' is in the standard library"),
    (["diff"], r"kernelsel diff: BASE: missing argument"),
    (["diff", "kernels.yaml"], r"kernelsel diff: HEAD: missing argument"),
    (["diff", "nowhere.yaml", "kernels.yaml"], r"kernelsel diff: 'nowhere\.yaml': no such file"),
    (["diff", "", "kernels.yaml"], r"kernelsel diff: '': an empty argument; give a manifest path or a git object"),
    (["diff", "--", "--output={dir}/x:y", "kernels.yaml"], r"kernelsel diff: '--output=.*: starts with '-'; give a manifest path"),
    (["diff", "HEAD:", "kernels.yaml"], r"kernelsel diff: 'HEAD:': not a file in git \(REF:PATH names a tree\)"),
    (["diff", "kernels.yaml", "kernels.yaml", "--json", "--markdown"], r"kernelsel diff: give --json or --markdown, not both"),
    (["diff", "{dup}", "kernels.yaml"], r"kernelsel diff: .*dup\.yaml:2:1: \(top level\): duplicate key 'schema_version'"),
    (["matrix", "--manifest", "{missing}"], r"kernelsel matrix: --manifest: .*cannot read manifest"),
    (["matrix", "--out", ""], r"kernelsel matrix: --out: an empty path; leave the option out for the default$"),
    (["matrix", "--manifest", ""], r"kernelsel matrix: --manifest: an empty path"),
    (["matrix", "--out", "{dir}"], r"kernelsel matrix: --out: .* is a directory"),
    (["matrix", "--out", "{nodir}"], r"kernelsel matrix: .*nodir/x: No such file or directory"),
    (["schema", "--out", "{nodir}"], r"kernelsel schema: .*nodir/x: No such file or directory"),
    (["schema", "--out", ""], r"kernelsel schema: --out: an empty path; leave the option out for the default$"),
    (["schema", "--check", "--bogus"], r"kernelsel schema: no such option --bogus"),
    (["verify", "--op", "x"], rf"kernelsel verify: --op: 'x' is not one of {ONE_OF_OPS}"),
    (["verify", "--solution", "flashinfr"], r"kernelsel verify: --solution: 'flashinfr' is not one of .*\(did you mean 'flashinfer'\?\)"),
    (["verify", "--device", "tpu"], r"kernelsel verify: --device: 'tpu' is not a device; expected cuda, cuda:N or cpu$"),
    (["verify", "--out", ""], r"kernelsel verify: --out: an empty path"),
    (["verify", "--kernel", "nope", "--device", "cpu"], r"kernelsel verify: (no kernel named 'nope'|verify needs torch)"),
    (["bench"], r"kernelsel bench: give --op \(and the grid options\) or --suite, not both"),
    (["bench", "--op", "mha_decode", "--suite", "x.yaml"], r"kernelsel bench: give --op \(and the grid options\) or --suite, not both"),
    (["bench", "--op", "mha_decode", "--repeats", "0"], r"kernelsel bench: --repeats: 0 is not in the range x>=1"),
    (["bench", "--op", "mha_decode", "--batch", "a,b"], r"kernelsel bench: --batch: a, b is not a positive integer"),
    (["bench", "--op", "mha_decode", "--batch", "\u00b2"], r"kernelsel bench: --batch: '\u00b2' is not a positive integer"),
    (["bench", "--op", "mha_decode", "--batch", "{digits}"], r"kernelsel bench: --batch: '9+\.\.\. is not a positive integer"),
    (["bench", "--op", "mha_decode", "--device", "tpu"], r"kernelsel bench: --device: 'tpu' is not a device; expected cuda, cuda:N or cpu$"),
    (["bench", "--op", "mha_decode", "--out", ""], r"kernelsel bench: --out: an empty path"),
    (["bench", "--suite", ""], r"kernelsel bench: --suite: an empty path"),
    (["bench", "--op", "mha_decode", "--batch", "{many}", "--kv-len", "{many}"],
     r"kernelsel bench: the grid has 9,000,000 cases \(3,000 batch x 3,000 kv_len\), over the limit of 4,096 for one run"),
    (["bench", "--op", "mha_decode", "--new-len", "4"], r"kernelsel bench: --new-len is for mha_extend and mha_prefill"),
    (["bench", "--op", "mha_decode", "--device", "cpu"], r"kernelsel bench: (bench --device cpu needs --arch|bench needs torch)"),
    (["bench", "--suite", "{missing}", "--device", "cpu", "--arch", "sm_90"], r"kernelsel bench: (.*missing\.yaml: cannot read suite|bench needs torch)"),
    (["bench", "--suite", "{dup}", "--device", "cpu", "--arch", "sm_90"], r"kernelsel bench: (invalid suite: .*dup\.yaml:2:1: \(top level\): duplicate key|bench needs torch)"),
    (["model", "{config}", "--manifest", ""], r"kernelsel model: --manifest: an empty path"),
    (["verify-model", "--out", ""], r"kernelsel verify-model: --out: an empty path"),
    (["doctor", "--arch", "sm_95"], r"kernelsel doctor: --arch: 'sm_95' is not an SM"),
    (["bench", "--from", "{missing}"], r"kernelsel bench: --from draws a results file: give --plot PATH\.png too"),
    (["bench", "--plot", "{nodir}", "--from", "{missing}"], r"kernelsel bench: --from: .*missing\.yaml: cannot read"),
    (["tune"], r"kernelsel tune: --model: required"),
    (["tune", "--model", "{missing}"], r"kernelsel tune: --model: .*missing\.yaml: cannot read"),
    (["tune", "--model", "{dup}", "--ops", "prefill"], r"kernelsel tune: --ops: 'prefill': expected decode, extend"),
    (["tune", "--model", "{dup}", "--budget-ms", "0"], r"kernelsel tune: --budget-ms: 0.*is not in the range x>=1"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-bad")
    (d / "dir.yaml").mkdir()
    (d / "config.json").write_text("{}")
    (d / "dup.yaml").write_text("schema_version: 1\nschema_version: 1\n")
    (d / "binary.yaml").write_bytes(b"schema_version: \xff\n")
    valid = (ROOT / "tests/registry/broken/_valid.yaml").read_text()
    (d / "broken.yaml").write_text(valid.replace("op: mha_decode", "op: mha_decod").replace("priority: 5", "priority: 99"))
    (d / "unknownperf.yaml").write_text("schema_version: 1\ngpu: x\narch: sm_90\nentries:\n"
                                        "- {op: mha_decode, shape: {q_dtype: bf16}, median_us: {triton-mha-decod: 1}}\n")
    (d / "badperf.yaml").write_text("schema_version: 1\ngpu: x\narch: sm_90\n"
                                    "entries: [{op: mha_decode, shape: {q_dtype: bf17}, median_us: {a: 1}}]\n")
    return {"missing": d / "missing.yaml", "dir": d / "dir.yaml", "dup": d / "dup.yaml", "binary": d / "binary.yaml",
            "broken": d / "broken.yaml", "badperf": d / "badperf.yaml", "unknownperf": d / "unknownperf.yaml",
            "nodir": d / "nodir" / "x", "digits": "9" * 5000, "config": d / "config.json",
            "many": ",".join(str(i) for i in range(1, 3001))}


@pytest.mark.parametrize("argv, line", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_invocations_exit_2_with_one_line(cli, files, monkeypatch, argv, line):
    monkeypatch.chdir(ROOT)
    argv = [str(a).format(**files) if "{" in a else a for a in argv]
    code, out, err = cli(*argv)
    assert code == 2, (code, out[-500:], err)
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert re.match(line, err), err
    assert "Traceback" not in out + err and "Usage:" not in err and "Try '" not in err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is detected here, so no --arch is fine")
def test_no_arch_and_no_gpu(cli):
    code, _, err = cli("explain", "--op", "mha_decode", "--installed-only")
    assert code == 2 and err == ("kernelsel explain: no --arch given and no NVIDIA GPU detected (nvidia-smi); "
                                 "pass --arch sm_90\n")


def test_help_and_version_exit_0(cli):
    assert cli("--help")[0] == 0 and cli("explain", "--help")[0] == 0
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("kernelsel ")


def test_no_command_prints_help_and_one_error_line(cli):
    code, out, err = cli()
    assert code == 2 and "Commands:" in out and err.count("\n") == 1


def test_bad_environment_variables_are_named(cli, monkeypatch):
    monkeypatch.setenv("KERNELSEL_ADAPTER_ALLOWLIST", "subprocess")
    code, _, err = cli(*E)
    assert code == 2 and re.fullmatch(r"kernelsel explain: KERNELSEL_ADAPTER_ALLOWLIST: 'subprocess' is in the "
                                      r"standard library.*\n", err)
    monkeypatch.delenv("KERNELSEL_ADAPTER_ALLOWLIST")
    monkeypatch.setenv("KERNELSEL_PREDICT", "sometimes")
    code, _, err = cli(*E)
    assert code == 2 and re.fullmatch(r"kernelsel explain: KERNELSEL_PREDICT: 'sometimes' is not a switch; use on or off "
                                      r"\(1/0, true/false\)\n", err)
    monkeypatch.delenv("KERNELSEL_PREDICT")
    monkeypatch.setenv("KERNELSEL_MANIFEST", str(ROOT / "no-such.yaml"))
    code, _, err = cli(*E)
    assert code == 2 and re.fullmatch(r"kernelsel explain: KERNELSEL_MANIFEST: .*no-such\.yaml: cannot read manifest: "
                                      r"No such file or directory\n", err)


def test_the_console_script_prints_one_line_without_a_traceback():
    """Through a real process: the same single line, exit 2 (nothing swallowed by the in-process runner)."""
    out = subprocess.run([sys.executable, "-m", "selector.tools.cli", "explain", "--op", "mha_decode", "--arch", "sm_90",
                          "--q-dtype", "bf17"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("kernelsel explain: --q-dtype: 'bf17' is not a dtype") and out.stderr.count("\n") == 1
