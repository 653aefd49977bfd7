"""Reference for lorad's GGUF loader: transformers' own GGUF path on the same file.

transformers dequantizes the GGUF (with the `gguf` package), reverses llama.cpp's Q/K permutation and
rebuilds the tokenizer from the metadata, independently of lorad. This prints the chat-rendered prompt's
token ids, the greedy completion's ids and text, and the last-position logits' top 5, in the same shape
as `lorad generate`, so the two can be compared id for id.

    bench/.venv/bin/python bench/gguf_check.py MODEL.gguf "PROMPT" [MAX_NEW]
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    path, prompt = sys.argv[1], sys.argv[2]
    max_new = int(sys.argv[3]) if len(sys.argv) > 3 else 48
    torch.set_num_threads(2)
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    print(f"--- prompt ({len(ids)} tokens)\n{text}")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 5)
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )[0, len(ids):].tolist()
    print(f"--- completion ({len(out)} tokens)\n{tok.decode(out, skip_special_tokens=True)}")
    print(f"--- prompt ids {ids}")
    print(f"--- completion ids {out}")
    print(f"--- top5 last-position logits {[(i, round(v, 4)) for v, i in zip(top.values.tolist(), top.indices.tolist())]}")


if __name__ == "__main__":
    main()
