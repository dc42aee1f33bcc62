// Bitmap scans: a word-at-a-time C core and thin napi wrappers.
#include "bitmap.h"

#include <string.h>

#include "addon.h"

namespace ulob {

namespace {

// Loads the 64 bits starting at bit 64 * word as a little-endian word, so
// bit n of the bitmap is bit (n & 63) of word (n >> 6) on any host. Bytes at
// or past `nbytes` read as zero: the bitmap's last word is usually partial
// and the memory after it is not ours. memcpy makes the load legal for any
// alignment of `p` (Uint8Array subarrays start anywhere) and compiles to a
// single load on x86-64 and arm64.
inline uint64_t LoadWord(const uint8_t* p, uint64_t word, size_t nbytes) {
  // Callers only ask for words that start inside the buffer, so this fits size_t.
  size_t b = static_cast<size_t>(word * 8);
  uint64_t w = 0;
  if (b + 8 <= nbytes) {
    memcpy(&w, p + b, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
  }
  for (size_t i = 0; b + i < nbytes; i++) w |= static_cast<uint64_t>(p[b + i]) << (8 * i);
  return w;
}

inline size_t BytesFor(uint64_t nbits) { return static_cast<size_t>((nbits + 7) >> 3); }

// Bits at and above `bit & 63` within a word.
inline uint64_t HeadMask(uint64_t bit) { return ~0ULL << (bit & 63); }
// Bits below `end & 63` within a word; all bits if end is word aligned.
inline uint64_t TailMask(uint64_t end) {
  return (end & 63) ? (1ULL << (end & 63)) - 1 : ~0ULL;
}

template <bool kClear>
uint64_t FindNext(const uint8_t* p, uint64_t nbits, uint64_t from) {
  if (from >= nbits) return nbits;
  size_t nbytes = BytesFor(nbits);
  uint64_t last = (nbits - 1) >> 6;
  uint64_t i = from >> 6;
  uint64_t flip = kClear ? ~0ULL : 0;
  uint64_t w = (LoadWord(p, i, nbytes) ^ flip) & HeadMask(from);
  while (w == 0) {
    if (++i > last) return nbits;
    w = LoadWord(p, i, nbytes) ^ flip;
  }
  // Bits past nbits in the last word may be anything (or zero-padded, which
  // reads as clear); clamp rather than mask.
  uint64_t r = i * 64 + static_cast<uint64_t>(__builtin_ctzll(w));
  return r < nbits ? r : nbits;
}

}  // namespace

uint64_t bit_find_next_set(const uint8_t* p, uint64_t nbits, uint64_t from) {
  return FindNext<false>(p, nbits, from);
}

uint64_t bit_find_next_clear(const uint8_t* p, uint64_t nbits, uint64_t from) {
  return FindNext<true>(p, nbits, from);
}

uint64_t bit_count(const uint8_t* p, uint64_t from, uint64_t to) {
  if (from >= to) return 0;
  size_t nbytes = BytesFor(to);
  uint64_t i = from >> 6;
  uint64_t last = (to - 1) >> 6;
  uint64_t w = LoadWord(p, i, nbytes) & HeadMask(from);
  if (i == last) return static_cast<uint64_t>(__builtin_popcountll(w & TailMask(to)));
  uint64_t n = static_cast<uint64_t>(__builtin_popcountll(w));
  for (i++; i < last; i++) n += static_cast<uint64_t>(__builtin_popcountll(LoadWord(p, i, nbytes)));
  return n + static_cast<uint64_t>(__builtin_popcountll(LoadWord(p, last, nbytes) & TailMask(to)));
}

// Writes go byte-wise at the edges and through memset in between: memset is
// already word-at-a-time and alignment-aware, and byte stores never touch
// memory outside [from, to)'s bytes.
void bit_set_range(uint8_t* p, uint64_t from, uint64_t to) {
  if (from >= to) return;
  size_t fb = static_cast<size_t>(from >> 3);
  size_t lb = static_cast<size_t>((to - 1) >> 3);
  uint8_t head = static_cast<uint8_t>(0xFFu << (from & 7));
  uint8_t tail = static_cast<uint8_t>(0xFFu >> (7 - ((to - 1) & 7)));
  if (fb == lb) {
    p[fb] |= head & tail;
    return;
  }
  p[fb] |= head;
  memset(p + fb + 1, 0xFF, lb - fb - 1);
  p[lb] |= tail;
}

void bit_clear_range(uint8_t* p, uint64_t from, uint64_t to) {
  if (from >= to) return;
  size_t fb = static_cast<size_t>(from >> 3);
  size_t lb = static_cast<size_t>((to - 1) >> 3);
  uint8_t head = static_cast<uint8_t>(0xFFu << (from & 7));
  uint8_t tail = static_cast<uint8_t>(0xFFu >> (7 - ((to - 1) & 7)));
  if (fb == lb) {
    p[fb] &= static_cast<uint8_t>(~(head & tail));
    return;
  }
  p[fb] &= static_cast<uint8_t>(~head);
  memset(p + fb + 1, 0, lb - fb - 1);
  p[lb] &= static_cast<uint8_t>(~tail);
}

namespace {

// Reads (buf, a, b) and checks a <= b <= 8 * buf.length. For the finds the
// pair is (nbits, from) and the order check is from <= nbits, so the callers
// pass which index is the upper bound.
bool BitArgs(const Napi::CallbackInfo& info, Bytes* buf, uint64_t* lo, uint64_t* hi,
             bool swapped) {
  int64_t a, b;
  if (!ArgBytes(info, 0, buf) || !ArgInt64(info, 1, &a) || !ArgInt64(info, 2, &b)) {
    return false;
  }
  int64_t low = swapped ? b : a;
  int64_t high = swapped ? a : b;
  if (low > high || static_cast<uint64_t>(high) > static_cast<uint64_t>(buf->length) * 8) {
    Napi::RangeError::New(info.Env(), "bit range outside the buffer")
        .ThrowAsJavaScriptException();
    return false;
  }
  *lo = static_cast<uint64_t>(low);
  *hi = static_cast<uint64_t>(high);
  return true;
}

// bitFindNextSet(buf, nbits, from) / bitFindNextClear(buf, nbits, from)
template <bool kClear>
Napi::Value BitFindNext(const Napi::CallbackInfo& info) {
  Bytes buf;
  uint64_t from, nbits;
  if (!BitArgs(info, &buf, &from, &nbits, true)) return Napi::Value();
  uint64_t r = kClear ? bit_find_next_clear(buf.data, nbits, from)
                    : bit_find_next_set(buf.data, nbits, from);
  return Napi::Number::New(info.Env(), static_cast<double>(r));
}

// bitCount(buf, from, to)
Napi::Value BitCount(const Napi::CallbackInfo& info) {
  Bytes buf;
  uint64_t from, to;
  if (!BitArgs(info, &buf, &from, &to, false)) return Napi::Value();
  return Napi::Number::New(info.Env(),
                           static_cast<double>(bit_count(buf.data, from, to)));
}

// bitSetRange(buf, from, to) / bitClearRange(buf, from, to)
template <bool kClear>
Napi::Value BitRange(const Napi::CallbackInfo& info) {
  Bytes buf;
  uint64_t from, to;
  if (!BitArgs(info, &buf, &from, &to, false)) return Napi::Value();
  if (kClear) {
    bit_clear_range(buf.data, from, to);
  } else {
    bit_set_range(buf.data, from, to);
  }
  return info.Env().Undefined();
}

}  // namespace

bool InitBitmap(Napi::Env env, Napi::Object exports) {
  return Export<BitFindNext<false>>(env, exports, "bitFindNextSet") &&
         Export<BitFindNext<true>>(env, exports, "bitFindNextClear") &&
         Export<BitCount>(env, exports, "bitCount") &&
         Export<BitRange<false>>(env, exports, "bitSetRange") &&
         Export<BitRange<true>>(env, exports, "bitClearRange");
}

}  // namespace ulob
