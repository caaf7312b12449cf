# Generates the wgmma inline-assembly wrappers (one per N; A from registers, "rs", or from
# shared memory, "ss") that common.cuh holds between its GENERATED markers.
def wrap(items, indent, width=96):
    lines, cur = [], ""
    for it in items:
        piece = (", " if cur else "") + it
        if len(indent) + len(cur) + len(piece) > width:
            lines.append(cur + ",")
            cur = it
        else:
            cur += piece
    lines.append(cur)
    return ("\n" + indent).join(lines)

out = []
for n in (64, 128, 192, 256):
    m = n // 2
    dregs = [f"%{i}" for i in range(m)]
    dcons = [f'"+f"(d[{i}])' for i in range(m)]
    ind = " " * 10
    dl = '"\n        "'.join(wrap(dregs, "", 80).split("\n"))
    for kind in ("rs", "ss"):
        if kind == "rs":
            sig = f"const unsigned (&a)[4],\n                                                unsigned long long b_desc, int accumulate"
            p = m + 5
            ops = f'"{{%{m}, %{m+1}, %{m+2}, %{m+3}}}, %{m+4}, p, 1, 1, %{m+6};\\n}}\\n"'
            ins = '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)'
        else:
            sig = f"unsigned long long a_desc,\n                                                unsigned long long b_desc, int accumulate"
            p = m + 2
            ops = f'"%{m}, %{m+1}, p, 1, 1, 0, %{m+3};\\n}}\\n"'
            ins = '"l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TRANS_B)'
        out.append(
            f"template <int TRANS_B>\n"
            f"__device__ __forceinline__ void wgmma_{kind}_n{n}(float (&d)[{m}], {sig}) {{\n"
            f"    asm volatile(\n"
            f'        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{p}, 0;\\n"\n'
            f'        "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{"\n'
            f'        "{dl}}}, "\n'
            f"        {ops}\n"
            f"        : {wrap(dcons, ind)}\n"
            f"        : {ins}\n"
            f"        : \"memory\");\n"
            f"}}\n")
print("\n".join(out), end="")
