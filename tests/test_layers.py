"""The layers keep their direction: lanes import freshrec and the model library (recmodels) only,
never each other; recmodels imports freshrec and no lane; freshrec imports neither (except the command
in freshrec/cli, lazily); DAG files import no heavy library at parse."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANES = {"spark_jobs", "training", "serving", "nearline"}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_lanes_import_only_freshrec_and_themselves():
    bad = []
    for lane in LANES:
        for f in (ROOT / lane).rglob("*.py"):
            others = _imports(f) & (LANES - {lane})
            if others:
                bad.append(f"{f.relative_to(ROOT)} imports {sorted(others)}")
    assert not bad, bad


def test_bottom_layer_imports_no_lane_outside_cli():
    bad = []
    for f in (ROOT / "freshrec").rglob("*.py"):
        if "cli" in f.relative_to(ROOT).parts:
            top = _imports(f, top_level_only=True) & LANES
            if top:
                bad.append(f"{f.relative_to(ROOT)} imports {sorted(top)} at module level")
        elif _imports(f) & (LANES | {"dags", "recmodels"}):
            bad.append(f"{f.relative_to(ROOT)} imports {sorted(_imports(f) & (LANES | {'recmodels'}))}")
    assert not bad, bad


def test_model_library_imports_no_lane():
    bad = [f"{f.relative_to(ROOT)} imports {sorted(_imports(f) & (LANES | {'dags'}))}"
           for f in (ROOT / "recmodels").rglob("*.py") if _imports(f) & (LANES | {"dags"})]
    assert not bad, bad


def test_dag_files_import_nothing_heavy_at_module_level():
    for f in (ROOT / "dags").glob("*.py"):
        heavy = _imports(f, top_level_only=True) & {"pyspark", "torch", "faiss", "mlflow", *LANES}
        assert not heavy, f"{f.name} imports {heavy} at parse time"


def _lane_strings(path: Path) -> set[str]:
    """String literals that name a lane module ("spark_jobs.gate"): imports the AST cannot see."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            head, _, rest = node.value.partition(".")
            if head in LANES and rest and rest.replace("_", "").replace(".", "").isalnum():
                found.add(node.value)
    return found


def test_the_jobs_table_names_lane_modules_that_exist_and_is_the_only_one():
    """Job modules are named as strings (the bottom floor imports no lane): each must be a
    module of a lane, and no other bottom-floor file may name a lane module as a string."""
    import importlib.util

    from freshrec.contracts.jobs import JOBS

    for job in JOBS:
        assert job.module.split(".")[0] in LANES, job
        assert importlib.util.find_spec(job.module) is not None, f"{job.module} does not exist"
    table = ROOT / "freshrec" / "contracts" / "jobs.py"
    bad = {str(f.relative_to(ROOT)): sorted(names) for f in (ROOT / "freshrec").rglob("*.py")
           if f != table and "cli" not in f.relative_to(ROOT).parts
           and (names := _lane_strings(f))}
    assert not bad, f"lane modules named outside freshrec/contracts/jobs.py: {bad}"
