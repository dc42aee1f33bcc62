// Plain C core of the bitmap scans: no napi, no allocation, no bounds checks
// beyond what the arguments promise.
//
// Bit order is LSB-first: bit n lives in byte (n >> 3) under mask
// (1 << (n & 7)). Callers guarantee every bit index touched is below
// 8 * (bytes available at p), and from <= to / from <= nbits.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace ulob {

// First set bit in [from, nbits), or nbits if there is none.
uint64_t bit_find_next_set(const uint8_t* p, uint64_t nbits, uint64_t from);
// First clear bit in [from, nbits), or nbits if there is none.
uint64_t bit_find_next_clear(const uint8_t* p, uint64_t nbits, uint64_t from);
// Number of set bits in [from, to).
uint64_t bit_count(const uint8_t* p, uint64_t from, uint64_t to);
// Sets / clears the bits in [from, to).
void bit_set_range(uint8_t* p, uint64_t from, uint64_t to);
void bit_clear_range(uint8_t* p, uint64_t from, uint64_t to);

}  // namespace ulob
