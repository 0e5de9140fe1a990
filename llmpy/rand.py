"""llm.c's two random number generators, bit for bit, so that a run here and in llm.c draw the same numbers. NumPy only.

- Mt19937 (llmc/rand.h): the Mersenne Twister, seeded as torch.manual_seed and llm.c's manual_seed seed it. The
  training loader shuffles with it (random_permutation). NumPy's MT19937 is the same generator and its legacy
  seeding (RandomState(seed)) is the same init_genrand, so the numbers come from NumPy in bulk; what is llm.c's here
  is how a permutation draws them and how the state is laid out in a checkpoint (llm.c writes its C struct).
- Xorshift (llmc/sampler.h): the xorshift64* generator llm.c samples tokens with (random_f32).
"""

import numpy as np

MT_N = 624  # 32-bit words of state
_MATRIX_A = 0x9908B0DF
# llm.c's mt19937_state as it writes it to a checkpoint: unsigned long long seed_; int left_; unsigned int next_;
# unsigned int state_[624]; unsigned int MATRIX_A[2] (2,520 bytes, no padding)
MT_STATE_DTYPE = np.dtype([("seed", "<u8"), ("left", "<i4"), ("next", "<u4"), ("state", "<u4", (MT_N,)),
                           ("matrix_a", "<u4", (2,))])
MT_STATE_BYTES = MT_STATE_DTYPE.itemsize


class Mt19937:
    def __init__(self, seed):
        self.seed = int(seed) & 0xFFFFFFFF
        self._bits = np.random.RandomState(self.seed)._bit_generator  # init_genrand(seed), as manual_seed

    def randint32(self, count):
        """The next count outputs, uint32: llm.c's randint32 called count times."""
        return self._bits.random_raw(count).astype(np.uint32)

    def permute(self, data):
        """Shuffles the 1-D int array data in place as llm.c's random_permutation: for i = n-1 down to 1, swap
        data[i] with data[randint32() % (i + 1)] (Fisher-Yates, one draw per i)."""
        n = len(data)
        if n < 2:
            return
        picks = (self.randint32(n - 1) % np.arange(n, 1, -1, dtype=np.uint32)).tolist()
        values = data.tolist()
        for i, j in zip(range(n - 1, 0, -1), picks):
            values[i], values[j] = values[j], values[i]
        data[:] = values

    def to_bytes(self):
        """The state as llm.c's struct. NumPy's position `pos` is llm.c's next_ (left_ = 625 - next_ counts the
        draws until the next twist); a fresh seed has pos 624, which llm.c writes as next_ 0, left_ 1: both twist
        at the next draw."""
        state = self._bits.state["state"]
        record = np.zeros((), dtype=MT_STATE_DTYPE)
        record["seed"], record["state"], record["matrix_a"] = self.seed, state["key"], (0, _MATRIX_A)
        record["next"], record["left"] = state["pos"], MT_N + 1 - state["pos"]
        return record.tobytes()

    @classmethod
    def from_bytes(cls, data):
        """The generator whose state llm.c's struct holds (to_bytes' inverse, and llm.c's own checkpoints)."""
        record = np.frombuffer(data, dtype=MT_STATE_DTYPE, count=1)[0]
        if tuple(record["matrix_a"]) != (0, _MATRIX_A) or not 0 <= int(record["next"]) <= MT_N:
            raise ValueError("not an mt19937 state")
        rng = cls(int(record["seed"]))
        pos = MT_N if int(record["left"]) <= 1 else int(record["next"])
        rng._bits.state = {"bit_generator": "MT19937", "state": {"key": record["state"].copy(), "pos": pos}}
        return rng


class Xorshift:
    """llm.c's sampling RNG: a 64-bit state, xorshift then a multiply (xorshift64*)."""

    MASK = (1 << 64) - 1

    def __init__(self, state):
        self.state = int(state) & self.MASK or 1  # an all-zero state would stay zero

    def random_u32(self):
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & self.MASK
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & self.MASK) >> 32

    def random_f32(self):
        """A float in [0, 1) with 24 random bits, as llm.c's random_f32."""
        return (self.random_u32() >> 8) / 16777216.0
