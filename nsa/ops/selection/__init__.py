"""Selection branch on the GPU: top-n block choice and group-centric selected attention."""

from nsa.ops.selection.launch import sel_forward, select_topn

__all__ = ["sel_forward", "select_topn"]
