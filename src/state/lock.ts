/**
 * One sidecar per state dir: `STATEDIR/breakwater.lock` holds the owner's pid. A second start
 * on the same config must not touch what the running one owns (its admin token, its state
 * file), so it refuses before writing anything. A lock whose pid is no longer alive (the owner
 * was killed with -9), or that is this process's own pid (a restarted container), is stale
 * and taken over — and so are the temp files a killed owner left behind.
 */
import { open, readFile, readdir, unlink, mkdir } from 'node:fs/promises'
import { join } from 'node:path'

/** The state dir is held by another live process. */
export class StateDirLocked extends Error {
  constructor (readonly dir: string, readonly pid: number) {
    super(`stateDir ${dir} is in use by another Breakwater (pid ${pid}); stop it first, or give this one its own stateDir`)
  }
}

export interface StateLock {
  path: string
  /** False when the lock file could not be written (stateDir unwritable): nothing is held. */
  held: boolean
  /** The pid of a dead owner whose lock was taken over, if any. */
  takenOverFrom: number | null
  /** Stale temp files removed (`state.json.tmp-*`, `admin.token.tmp-*` of other pids). */
  removed: string[]
  release: () => Promise<void>
}

/** Whether a process with this pid exists (EPERM: it does, owned by someone else). */
export function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/** Take the state dir for this process; throws StateDirLocked while another live sidecar holds it. */
export async function lockStateDir (dir: string, pid = process.pid): Promise<StateLock> {
  const path = join(dir, 'breakwater.lock')
  let takenOverFrom: number | null = null
  const release = async (): Promise<void> => {
    const owner = await readOwner(path)
    if (owner === pid) await unlink(path).catch(() => {})
  }
  try {
    await mkdir(dir, { recursive: true })
  } catch {
    return { path, held: false, takenOverFrom, removed: [], release: async () => {} }
  }
  // Two rounds: the second after removing a stale lock (another starter may win that race).
  for (let round = 0; round < 2; round++) {
    try {
      const handle = await open(path, 'wx', 0o644)
      try {
        await handle.writeFile(`${pid}\n`)
        await handle.sync()
      } finally {
        await handle.close()
      }
      return { path, held: true, takenOverFrom, removed: await removeStaleTemps(dir, pid), release }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') return { path, held: false, takenOverFrom, removed: [], release: async () => {} }
    }
    const owner = await readOwner(path)
    if (owner !== null && owner !== pid && alive(owner) && await mayBeSidecar(owner)) throw new StateDirLocked(dir, owner)
    // Stale (dead owner, unreadable, or a previous life of this very pid): take it over.
    takenOverFrom = owner
    await unlink(path).catch(() => {})
  }
  const owner = await readOwner(path)
  throw new StateDirLocked(dir, owner ?? -1)
}

/**
 * Remove the temp files of atomic writes (state-file.ts, token.ts) that a killed sidecar left
 * behind. Only while holding the lock: then no other live sidecar writes here, and every temp
 * file not of `ownPid` is stale.
 */
async function removeStaleTemps (dir: string, ownPid: number): Promise<string[]> {
  let names: string[]
  try {
    names = await readdir(dir)
  } catch {
    return []
  }
  const removed: string[] = []
  for (const name of names) {
    const m = /^(?:state\.json|admin\.token)\.tmp-(\d+)(?:-\d+)?$/.exec(name)
    if (m === null || Number(m[1]) === ownPid) continue
    try {
      await unlink(join(dir, name))
      removed.push(name)
    } catch { /* gone already, or unwritable: harmless */ }
  }
  return removed
}

/**
 * After a container restart a recorded pid may belong to an unrelated live process (an init
 * such as tini). Where /proc tells, only a Node process counts as a possible owner.
 */
async function mayBeSidecar (pid: number): Promise<boolean> {
  try {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8')
    return /node|breakwater/i.test(cmdline)
  } catch {
    return true
  }
}

async function readOwner (path: string): Promise<number | null> {
  try {
    const n = Number.parseInt((await readFile(path, 'utf8')).trim(), 10)
    return Number.isInteger(n) && n > 0 ? n : null
  } catch {
    return null
  }
}
