"""`--setup` file for `tools/remote_reference.py outputs`: load the checkpoint the way pathinsight does.

The reference run loads with plain `from_pretrained` under transformers 4.33.2. Here the script's `load` is
replaced by `pathinsight.models.load_model(..., trust_remote_code=True)`, which applies the project's
run-time patches (`pathinsight.remote`), so the comparison checks the path users take.
`PATHINSIGHT_SKIP_PATCHES=name,...` leaves patches out (the negative tests)."""
import __main__
from pathinsight.models import load_model

def load(family, model_dir):
    "(model, tokenizer) of the checkpoint in `model_dir`, loaded by pathinsight in float32, eval mode."
    model, proc, _ = load_model(str(model_dir), trust_remote_code=True, dtype="float32")
    tok = getattr(proc, "tokenizer", proc)
    if family == "ixc2": model.tokenizer = tok
    return model, tok

__main__.load = load
