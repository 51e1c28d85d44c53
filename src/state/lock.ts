/**
 * One sidecar per state dir: `STATEDIR/breakwater.lock` holds the owner's pid and host. A second
 * start on the same config must not touch what the running one owns (its admin token, its state
 * file), so it refuses before writing anything. A lock whose pid is no longer alive on this host
 * (the owner was killed with -9), or that is this process's own pid (a restarted container), is
 * stale and taken over — and so are the temp files a killed owner left behind. A lock of another
 * host (a volume shared across nodes, or a re-created container: a new pod or container has a
 * new host name) is never judged by a pid, which means nothing here: it is a lease its holder
 * renews (the file's mtime, every `LEASE_RENEW_MS`), held while renewed, and stale once not for
 * `LEASE_STALE_MS`. Refusing such a lock for good would keep a pod re-created after an OOM kill
 * from ever starting.
 *
 * Race-free with any number of starters at one instant: the lock file appears whole or not at all
 * (written to a temp file, then `link(2)`ed into place, which fails if the name exists), so a
 * reader never sees an empty lock and mistakes it for a stale one; and a stale lock is removed
 * only by the holder of `breakwater.lock.takeover` (an exclusive create), after judging it stale
 * again under that guard, so two starters never both remove a lock and both take the dir.
 */
import { open, readFile, readdir, unlink, mkdir, link, stat, utimes, writeFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

/** The state dir is held by another live process (or by one on another host). */
export class StateDirLocked extends Error {
  constructor (readonly dir: string, readonly pid: number, readonly host: string | null = null) {
    super(host === null
      ? `stateDir ${dir} is in use by another Breakwater (pid ${pid}); stop it first, or give this one its own stateDir`
      : `stateDir ${dir} is in use by another Breakwater (pid ${pid} on host ${host}); stop it first, or give this one its own stateDir (its lock is taken over once it has not been renewed for ${LEASE_STALE_MS / 1000} s)`)
    this.name = 'StateDirLocked'
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

/** How long a take-over guard may stand before it is judged left by a starter that died holding it. */
const GUARD_STALE_MS = 10_000
/** How long a starter waits, in all, for another one's take-over to finish. */
const GUARD_WAIT_MS = 5_000
/** How often a holder renews its lock (its mtime), and how old a lock of another host is stale. */
const LEASE_RENEW_MS = 5_000
const LEASE_STALE_MS = 30_000

/** Take the state dir for this process; throws StateDirLocked while another live sidecar holds it. */
export async function lockStateDir (dir: string, pid = process.pid, renewMs = LEASE_RENEW_MS): Promise<StateLock> {

  const path = join(dir, 'breakwater.lock')
  const host = hostname()
  let takenOverFrom: number | null = null
  const unheld = (): StateLock => ({ path, held: false, takenOverFrom, removed: [], release: async () => {} })
  let renew: NodeJS.Timeout | undefined
  const release = async (): Promise<void> => {
    clearInterval(renew)
    const owner = await readOwner(path)
    if (owner?.pid === pid && (owner.host ?? host) === host) await unlink(path).catch(() => {})
  }
  const tmp = `${path}.tmp-${pid}-${Math.random().toString(36).slice(2)}`
  try {
    await mkdir(dir, { recursive: true })
    await writeFile(tmp, `${pid}\n${host}\n`, { mode: 0o644 })
    const handle = await open(tmp, 'r')
    await handle.sync().finally(() => { void handle.close() })
  } catch {
    await unlink(tmp).catch(() => {})
    return unheld()
  }
  try {
    const waitUntil = Date.now() + GUARD_WAIT_MS
    for (;;) {
      try {
        await link(tmp, path)
        renew = setInterval(() => {
          const now = new Date()
          utimes(path, now, now).catch(() => {})
        }, renewMs).unref()
        return { path, held: true, takenOverFrom, removed: await removeStaleTemps(dir, pid), release }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') return unheld()
      }
      const owner = await readOwner(path)
      if (owner !== null && await holds(path, owner, pid, host)) throw new StateDirLocked(dir, owner.pid, owner.host !== host ? owner.host : null)
      const took = await takeOver(path, pid, host)
      if (took === 'removed') takenOverFrom = owner?.pid ?? null
      else if (took === 'busy') {
        if (Date.now() > waitUntil) throw new StateDirLocked(dir, owner?.pid ?? -1, owner?.host ?? null)
        await sleep(10 + Math.random() * 20)
      }
      // 'gone': the lock went away meanwhile; try again.
    }
  } finally {
    await unlink(tmp).catch(() => {})
  }
}

/** Whether `owner` holds the dir: a live sidecar here, or one of another host that renewed its lease lately. */
async function holds (path: string, owner: Owner, pid: number, host: string): Promise<boolean> {
  if (owner.host !== null && owner.host !== host) return await stat(path).then((s) => Date.now() - s.mtimeMs < LEASE_STALE_MS, () => false)
  return owner.pid !== pid && alive(owner.pid) && await mayBeSidecar(owner.pid)
}

/**
 * Remove a stale lock, holding the take-over guard: under it the lock is judged again (another
 * starter may have taken over and written a live lock since), and removed only if still stale.
 * Nobody else removes a lock meanwhile (only the guard's holder does, and a live owner never
 * releases a lock it does not hold), and nobody creates one while it exists, so the file judged
 * is the file removed. 'busy': another starter holds the guard.
 */
async function takeOver (path: string, pid: number, host: string): Promise<'removed' | 'gone' | 'busy'> {
  const guard = `${path}.takeover`
  try {
    await (await open(guard, 'wx', 0o644)).close()
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') return 'busy'
    // A guard this old was left by a starter that died during its take-over (a window of
    // milliseconds): remove it, or no take-over would ever happen again.
    const since = await stat(guard).then((s) => Date.now() - s.mtimeMs, () => 0)
    if (since > GUARD_STALE_MS) await unlink(guard).catch(() => {})
    return 'busy'
  }
  try {
    const owner = await readOwner(path)
    if (!await stat(path).then(() => true, () => false)) return 'gone'
    // Held now (taken over by another starter since): the next round reads it and refuses.
    if (owner !== null && await holds(path, owner, pid, host)) return 'gone'
    await unlink(path).catch(() => {})
    return 'removed'
  } finally {
    await unlink(guard).catch(() => {})
  }
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
    const m = /^(state\.json|admin\.token|breakwater\.lock)\.tmp-(\d+)(?:-[0-9a-z]+)?$/.exec(name)
    if (m === null || Number(m[2]) === ownPid) continue
    // A lock temp file may be a live starter's, about to be refused: only a dead one's is stale.
    if (m[1] === 'breakwater.lock' && alive(Number(m[2]))) continue
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

interface Owner {
  pid: number
  /** Null in a lock written before hosts were recorded (then this host's is assumed). */
  host: string | null
}

/** The lock's owner; null when there is no lock or it cannot be read as one (then it is stale). */
async function readOwner (path: string): Promise<Owner | null> {
  try {
    const [first, second] = (await readFile(path, 'utf8')).split('\n')
    const pid = Number.parseInt((first ?? '').trim(), 10)
    const host = (second ?? '').trim()
    return Number.isInteger(pid) && pid > 0 ? { pid, host: host === '' ? null : host } : null
  } catch {
    return null
  }
}
