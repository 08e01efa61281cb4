"""Names the module adds to the federation wire (MSC2775, unstable prefix).

Peers that do not know them ignore them: a stock resident answers in full, a stock
joiner reads the extra members as more partial state.
"""

#: Query parameter of ``GET /state``: member events only; also the marker field of
#: such an answer.
MEMBERS_ONLY_PARAM = "org.matrix.msc2775.members_only"

#: Field of a partial ``/send_join`` answer: heroes and member counts.
SUMMARY_FIELD = "org.matrix.msc2775.summary"
