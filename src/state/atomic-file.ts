/**
 * Write a whole file so that a `kill -9` or a full disk at any instant leaves either the old
 * file or the new one, never a torn one: a temp file in the same directory, fsync, rename over
 * the old one, fsync of the directory. The state file and the generated admin token use it.
 */
import { open, rename, mkdir, unlink } from 'node:fs/promises'
import { dirname } from 'node:path'

let seq = 0

/**
 * Replace `path` with `text` atomically; the file has `mode` (less what the umask takes away,
 * never more) from its creation on, with no chmod that a volume may refuse. On any
 * failure the old file is untouched, no temp file stays behind, and the error is thrown.
 */
export async function writeFileAtomic (path: string, text: string, mode: number): Promise<void> {
  const dir = dirname(path)
  await mkdir(dir, { recursive: true })
  const tmp = `${path}.tmp-${process.pid}-${seq++}`
  // A temp file of this name left by a process killed mid-write (in a container the pid is
  // the same at every start) is removed, never written into: its mode, and whoever holds it
  // open or linked, are not ours. `wx` (O_EXCL) then creates a fresh file or fails.
  await unlink(tmp).catch(() => {})
  const handle = await open(tmp, 'wx', mode)
  try {
    try {
      await handle.writeFile(text)
      await handle.sync()
    } finally {
      await handle.close()
    }
    await rename(tmp, path)
  } catch (err) {
    // A full disk (ENOSPC), a quota (EDQUOT) or EIO after the temp file was made: the old
    // file is untouched, and the temp file must not stay behind to eat the little space
    // left, one more per failed write (nor hold a secret).
    await unlink(tmp).catch(() => {})
    throw err
  }
  // The rename itself must reach the disk too.
  const handleDir = await open(dir, 'r')
  try {
    await handleDir.sync()
  } finally {
    await handleDir.close()
  }
}
