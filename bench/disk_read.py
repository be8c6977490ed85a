"""Read speed of a fresh file after dropping it from the page cache: 64 MB sequential reads, then random
expert-sized reads (8, 12, 28 MB) on 1-24 threads, the pattern of the tiered runtime's disk reader.
Writes a 12 GiB file at /tmp/blob (or argv[1]).

Usage: python bench/disk_read.py [PATH]
"""
import os, time, random
from concurrent.futures import ThreadPoolExecutor
import sys
p = sys.argv[1] if len(sys.argv) > 1 else "/tmp/blob"; size = 12 << 30
fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC); chunk = os.urandom(64 << 20)
for i in range(size // len(chunk)): os.write(fd, chunk)
os.fsync(fd); os.close(fd)
fd = os.open(p, os.O_RDONLY)
def drop(): os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
def rd(off, n):
    b = bytearray(n); mv = memoryview(b); d = 0
    while d < n: d += os.preadv(fd, [mv[d:]], off + d)
drop(); t = time.perf_counter(); n = 0
while n < (3 << 30): rd(n, 64 << 20); n += 64 << 20
print(f"sequential 64 MB reads: {n / (time.perf_counter() - t) / 1e9:.2f} GB/s", flush=True)
random.seed(0)
for sz, workers in [(8 << 20, 1), (8 << 20, 8), (12 << 20, 8), (28 << 20, 1), (8 << 20, 24)]:
    offs = [random.randrange(0, size - sz) // 4096 * 4096 for _ in range(max(24, (2 << 30) // sz))]
    drop(); t = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex: list(ex.map(lambda o: rd(o, sz), offs))
    print(f"random {sz >> 20} MB reads, {workers} threads: {len(offs) * sz / (time.perf_counter() - t) / 1e9:.2f} GB/s", flush=True)
