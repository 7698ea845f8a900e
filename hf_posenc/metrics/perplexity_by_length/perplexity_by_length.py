"""`evaluate` metric: perplexity of a causal LM on the given texts at several context lengths.

Loaded from its local path, so it needs no download (the Hub's `perplexity` metric does):

    import evaluate, hf_posenc
    metric = evaluate.load(hf_posenc.PERPLEXITY_METRIC)
    metric.compute(predictions=texts, model_id="runs/train/final", lengths=[128, 512], stride=None)
"""

import datasets
import evaluate

_DESCRIPTION = """Perplexity against context length: the texts are joined, tokenized (the model folder's tokenizer,
else UTF-8 bytes) and read in windows of each length, non-overlapping or sliding with a stride. Works for any causal
LM that transformers can load, hf_posenc models included."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): a saved causal LM (folder or Hub name).
    lengths (list of int): window lengths, default [128].
    stride (int, optional): score only the last `stride` tokens of windows that start every `stride` tokens.
    max_tokens (int, optional): score only the first `max_tokens` tokens at every length.
    tokenizer (str, optional): "bytes" or a tokenizer path/name; default: the model's, else bytes.
    device (str, optional): "cpu", "cuda", ...
Returns:
    {"perplexities": {length: ppl}, "tokens": {length: scored tokens}} (a length the model cannot embed gives None).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerplexityByLength(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self, predictions, model_id, lengths=(128,), stride=None, max_tokens=None, tokenizer=None, device=None
    ):
        import torch
        from transformers import AutoModelForCausalLM

        from hf_posenc.workflow.data import load_tokenizer
        from hf_posenc.workflow.evaluation import perplexity

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_id).to(device)
        encode = load_tokenizer(tokenizer, model_id)
        tokens = torch.tensor(encode("\n".join(predictions), add_special_tokens=False)["input_ids"])
        perplexities, counts = {}, {}
        for length in lengths:
            try:
                result = perplexity(model, tokens, length, stride=stride, max_tokens=max_tokens)
            except (ValueError, IndexError):  # a position table that ends, or too little text
                perplexities[length], counts[length] = None, 0
                continue
            perplexities[length], counts[length] = result["ppl"], result["tokens"]
        return {"perplexities": perplexities, "tokens": counts}
