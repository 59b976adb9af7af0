"""A trie over full KV blocks, for prefix sharing.

Each node is one full block of ``block_size`` token ids, under the node of the block before it,
so a path from the root spells a prefix and a node stands for everything before it too (the
chain). A node's key among its siblings is its token tuple: Python hashes it, and a hit compares
the tokens themselves, so a hash collision can never hand out the wrong K/V.

K/V depend on the weights that computed them, so every LoRA adapter a request may choose has
its own root (a namespace: "" for the default adapter, else the adapter's name); the same
tokens under another adapter never match.

The trie only knows which physical block holds each node; ref counts and the free / used /
cached states live in ``BlockPool``. Invariant the pool relies on: whoever holds a node's block
also holds its parent's (a sequence shares a whole matched path, and only extends the path it
holds), so a cached node never has a used descendant and leaves-first eviction can always free
every cached block.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class TrieNode:
    block: int  # physical block id; -1 for the root
    tokens: tuple[int, ...]
    parent: TrieNode | None
    children: dict[tuple[int, ...], TrieNode] = field(default_factory=dict)


class PrefixTrie:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.root = TrieNode(-1, (), None)  # the default namespace's
        self._roots: dict[str, TrieNode] = {"": self.root}
        self._nodes: dict[int, TrieNode] = {}  # block id -> its node

    def __contains__(self, block: int) -> bool:
        return block in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def root_of(self, namespace: str = "") -> TrieNode:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TrieNode(-1, (), None)
        return root

    def match(self, token_ids: list[int], max_blocks: int, namespace: str = "") -> list[TrieNode]:
        """The longest cached path spelling a prefix of ``token_ids``, at most ``max_blocks``
        long, in ``namespace``."""
        bs, node, path = self.block_size, self._roots.get(namespace), []
        if node is None:
            return path
        for i in range(min(max_blocks, len(token_ids) // bs)):
            node = node.children.get(tuple(token_ids[i * bs : (i + 1) * bs]))
            if node is None:
                break
            path.append(node)
        return path

    def insert(self, parent: TrieNode, tokens: tuple[int, ...], block: int) -> tuple[TrieNode, bool]:
        """Put ``block`` (holding ``tokens``) under ``parent``. If that prefix is cached already,
        return the existing node and False: the caller's block stays private."""
        existing = parent.children.get(tokens)
        if existing is not None:
            return existing, False
        assert block not in self._nodes, f"block {block} is in the trie twice"
        node = TrieNode(block, tokens, parent)
        parent.children[tokens] = node
        self._nodes[block] = node
        return node, True

    def is_leaf(self, block: int) -> bool:
        return not self._nodes[block].children

    def remove(self, block: int) -> None:
        """Drop a leaf."""
        node = self._nodes.pop(block)
        assert not node.children, f"block {block} still has children in the trie"
        del node.parent.children[node.tokens]

    def check_integrity(self) -> None:
        seen = 0
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            for key, child in node.children.items():
                assert child.parent is node and child.tokens == key and len(key) == self.block_size
                assert self._nodes.get(child.block) is child, f"block {child.block} is not indexed"
                stack.append(child)
                seen += 1
        assert seen == len(self._nodes), "the index holds nodes the trie does not reach"
