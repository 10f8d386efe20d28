"""One-off (2026-12-03): how far swapping the background colour word moves each token's text-encoder output
(norm of the change over the norm), per model; output in encoder-mixing.txt (ninth, then eleventh)."""
import sys
from transformers import UMT5EncoderModel, AutoTokenizer
for m in sys.argv[1:]:
    enc = UMT5EncoderModel.from_pretrained(m, subfolder="text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(m, subfolder="tokenizer")
    pairs = [("a red star bouncing on an orange plain background", "a red star bouncing on an green plain background"),
             ("two brown circles moving up on a cyan striped background", "two brown circles moving up on a white striped background"),
             ("a brown heart moving right over a green plain background", "a brown heart moving right over a purple plain background")]
    for a, b in pairs:
        ea, eb = (enc(**tok(x, return_tensors="pt")).last_hidden_state[0] for x in (a, b))
        d = ((ea - eb).norm(dim=-1) / ea.norm(dim=-1)).tolist()
        print(m.split('/')[-1][:20], " ".join(f"{w}:{v:.2f}" for w, v in zip(tok.convert_ids_to_tokens(tok(a)["input_ids"]), d)))
