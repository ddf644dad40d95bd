"""The runtime imports and answers with torch / transformers / onnx / sentencepiece unavailable."""

import json
import subprocess
import sys
import textwrap


def test_runtime_runs_without_export_dependencies(llava_model, tmp_path):
    from conftest import random_image

    img = tmp_path / "img.png"
    random_image(3).save(img)
    code = textwrap.dedent(f"""
        import sys, json
        class Block:
            BANNED = ("torch", "transformers", "onnx", "sentencepiece", "safetensors")
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BANNED:
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        from skin_offline.runtime.pipeline import SkinVL
        from skin_offline import cli  # the CLI module too
        m = SkinVL.load({str(llava_model.bundle_dir)!r}, threads=1)
        a = m.ask({str(img)!r}, "What is this?", max_new_tokens=8)
        print(json.dumps(a.token_ids))
        print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] in Block.BANNED)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []
    expected = llava_model.runtime.ask(str(img), "What is this?", max_new_tokens=8).token_ids
    assert json.loads(lines[-2]) == expected
