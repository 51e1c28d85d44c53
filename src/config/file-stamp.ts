/**
 * How a watched file (a certificate, the flag file, the admin token file) is told to have
 * changed: `stat` follows symlinks, so a Kubernetes Secret or ConfigMap volume's symlink swap
 * changes the inode, like a file rewritten in place changes its size and times.
 */
import type { Stats } from 'node:fs'

/** The file's stamp; `-` for a file that is not there. */
export function fileStamp (s: Stats | null): string {
  return s === null ? '-' : `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`
}
