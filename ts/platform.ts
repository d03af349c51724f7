// The npm platform packages this machine may use, as napi-rs names them (linux-x64-gnu, ...).
// Both C libraries are listed, glibc first: npm installs only the matching package, and a
// checkout holds only the platform it was built for.

export function platformNames(): string[] {
  return ['gnu', 'musl'].map((libc) => `${process.platform}-${process.arch}-${libc}`);
}
