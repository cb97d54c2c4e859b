# Test metrics of the best-so-far checkpoint of an unfinished baseline run of `fpt-monai accuracy`
# (for instance one cut off by the end of a session).
# Run: .venv/bin/python benchmarks/scripts/evaluate_best_checkpoint.py <work_dir>/<method> [dataset_dir]
#      dataset_dir defaults to <work_dir>/data/fpt_sample (where `fpt-monai accuracy` renders the sample task).
import json, sys
from pathlib import Path
from monai.bundle import ConfigWorkflow
from fpt_monai.bundle import bundle_dir, config_files, demo_config_names
run = Path(sys.argv[1]).absolute()
method = run.name  # fpt-monai accuracy puts each method's run in <work_dir>/<method>
dataset = sys.argv[2] if len(sys.argv) > 2 else str(run.parent / "data" / "fpt_sample")
common = {"bundle_root": str(run), "method": method, "dataset_dir": dataset,
          "checkpoints": {"best": str(run / "models" / "model.pt")}, "output_dir": str(run / "eval_partial")}
ev = ConfigWorkflow(config_file=config_files(*demo_config_names(method, evaluate=True)), meta_file=config_files("metadata")[0],
                    logging_file=str(bundle_dir() / "configs" / "logging.conf"), run_id="evaluating", workflow_type=None, **common)
ev.initialize(); r = ev.run()[0]; ev.finalize()
print(json.dumps(r))
