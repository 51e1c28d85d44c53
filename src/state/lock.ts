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
 * reader never sees an empty lock and mistakes it for a stale one. Where the filesystem has no
 * hard links (SMB shares, some FUSE mounts), the lock is an exclusive create written at once, and
 * an empty or cut lock younger than a few seconds counts as its writer's. A stale lock is removed
 * only by the holder of `breakwater.lock.takeover` (an exclusive create), after judging it stale
 * again under that guard, so two starters never both remove a lock and both take the dir; and a
 * guard left by a starter that died holding it is removed by one starter only.
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
  /** How the lock was put in place (`create` where the filesystem has no hard links). */
  method: LockMethod
  /** Why nothing is held (the error code of the write that failed), when not held. */
  error: string | null
  /** What `link(2)` failed with when the lock fell back to `create`. */
  linkError: string | null
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
/**
 * How long a lock still being written (empty, or cut before its last newline) counts as held by
 * its writer; older, it was left by a starter that died between creating and writing it.
 */
const YOUNG_LOCK_MS = 5_000
/** What `link(2)` fails with on a filesystem without hard links (SMB shares, some FUSE mounts). */
const NO_HARD_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS'])
/** How often a holder renews its lock (its mtime), and how old a lock of another host is stale. */
const LEASE_RENEW_MS = 5_000
const LEASE_STALE_MS = 30_000

/**
 * How the lock file is put in place: `link`, whole at once (a temp file linked to the name), or
 * `create` where the filesystem has no hard links: an exclusive create written at once, whose
 * readers take an empty or cut lock younger than a few seconds as its writer's.
 */
export type LockMethod = 'link' | 'create'

/** Take the state dir for this process; throws StateDirLocked while another live sidecar holds it. */
export async function lockStateDir (dir: string, pid = process.pid, method: LockMethod = 'link', renewMs = LEASE_RENEW_MS): Promise<StateLock> {
  const path = join(dir, 'breakwater.lock')
  const host = hostname()
  const content = `${pid}\n${host}\n`
  let takenOverFrom: number | null = null
  let how = method
  let linkError: string | null = null
  const unheld = (err: unknown): StateLock => ({ path, held: false, method: how, error: errorText(err), linkError, takenOverFrom, removed: [], release: async () => {} })
  let renew: NodeJS.Timeout | undefined
  const release = async (): Promise<void> => {
    clearInterval(renew)
    const owner = (await readLock(path)).owner
    if (owner?.pid === pid && (owner.host ?? host) === host) await unlink(path).catch(() => {})
  }
  try {
    await mkdir(dir, { recursive: true })
  } catch (err) {
    return unheld(err)
  }
  let tmp: string | null = null
  try {
    const waitUntil = Date.now() + GUARD_WAIT_MS
    for (;;) {
      let placed: boolean
      try {
        if (how === 'link') {
          tmp ??= await writeTemp(path, pid, content)
          placed = await placeByLink(tmp, path)
        } else {
          placed = await placeByCreate(path, content)
        }
      } catch (err) {
        if (how === 'link' && tmp !== null && NO_HARD_LINKS.has((err as NodeJS.ErrnoException).code ?? '')) {
          linkError = errorText(err)
          how = 'create'
          continue
        }
        return unheld(err)
      }
      if (placed) {
        renew = setInterval(() => {
          const now = new Date()
          utimes(path, now, now).catch(() => {})
        }, renewMs).unref()
        return { path, held: true, method: how, error: null, linkError, takenOverFrom, removed: await removeStaleTemps(dir, pid), release }
      }
      const lock = await readLock(path)
      if (lock.pending) {
        // Being written by a starter that created it a moment ago: it will be whole soon.
        await sleep(10 + Math.random() * 20)
        continue
      }
      const owner = lock.owner
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
    if (tmp !== null) await unlink(tmp).catch(() => {})
  }
}

const errorText = (err: unknown): string => (err as NodeJS.ErrnoException).code ?? (err as Error).message

/** The lock's content in a temp file, on disk, ready to be linked into place. */
async function writeTemp (path: string, pid: number, content: string): Promise<string> {
  const tmp = `${path}.tmp-${pid}-${Math.random().toString(36).slice(2)}`
  try {
    await writeFile(tmp, content, { mode: 0o644 })
    const handle = await open(tmp, 'r')
    await handle.sync().finally(() => { void handle.close() })
    return tmp
  } catch (err) {
    await unlink(tmp).catch(() => {})
    throw err
  }
}

/** Link `tmp` to the lock's name; false when a lock is there already. */
async function placeByLink (tmp: string, path: string): Promise<boolean> {
  try {
    await link(tmp, path)
    return true
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false
    throw err
  }
}

/** Create the lock's name exclusively and write it at once; false when a lock is there already. */
async function placeByCreate (path: string, content: string): Promise<boolean> {
  let handle
  try {
    handle = await open(path, 'wx', 0o644)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false
    throw err
  }
  try {
    await handle.writeFile(content)
    await handle.sync()
    await handle.close()
    return true
  } catch (err) {
    // A full disk: a lock left empty would hold the dir for nobody.
    await handle.close().catch(() => {})
    await unlink(path).catch(() => {})
    throw err
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
  const mine = await takeGuard(guard)
  if (mine === null) return 'busy'
  try {
    // Gone: removed, or never there when last read. A lock that is absent now may be linked into
    // place by another starter a moment later, so absence ends this take-over: a later look at the
    // name would find that live lock and remove it as stale.
    const lock = await readLock(path)
    if (lock.absent) return 'gone'
    // Held now (taken over by another starter since, or being written): the next round judges it.
    if (lock.pending || (lock.owner !== null && await holds(path, lock.owner, pid, host))) return 'gone'
    await unlink(path).catch(() => {})
    return 'removed'
  } finally {
    // Only this guard: one broken meanwhile (this starter stalled past GUARD_STALE_MS) is another's now.
    const now = await stat(guard, { bigint: true }).catch(() => null)
    if (now !== null && now.ino === mine.ino && now.mtimeNs === mine.mtimeNs) await unlink(guard).catch(() => {})
  }
}

interface GuardId { ino: bigint, mtimeNs: bigint }

/**
 * Create the take-over guard exclusively; null when another starter holds it. A guard older
 * than GUARD_STALE_MS was left by a starter that died holding it (a window of milliseconds) and
 * is removed, or no take-over would ever happen again — by one starter only: the one that
 * creates the break mark named after that very guard (its inode and time). Two starters that
 * judged it stale at one instant cannot then both remove a guard, the second one removing the
 * fresh guard of a third that took it meanwhile. Its remover competes for a new guard with the
 * others in the next round.
 */
async function takeGuard (guard: string): Promise<GuardId | null> {
  try {
    const handle = await open(guard, 'wx', 0o644)
    try {
      const s = await handle.stat({ bigint: true })
      return { ino: s.ino, mtimeNs: s.mtimeNs }
    } finally {
      await handle.close()
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') return null
  }
  const seen = await stat(guard, { bigint: true }).catch(() => null)
  if (seen === null || Date.now() - Number(seen.mtimeMs) <= GUARD_STALE_MS) return null
  const mark = `${guard}.break-${seen.ino}-${seen.mtimeNs}`
  try {
    await (await open(mark, 'wx', 0o644)).close()
  } catch (err) {
    // A mark this old was left by a remover that died in its own window of microseconds.
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      const since = await stat(mark).then((s) => Date.now() - s.mtimeMs, () => 0)
      if (since > GUARD_STALE_MS) await unlink(mark).catch(() => {})
    }
    return null
  }
  try {
    const now = await stat(guard, { bigint: true }).catch(() => null)
    if (now !== null && now.ino === seen.ino && now.mtimeNs === seen.mtimeNs) await unlink(guard).catch(() => {})
  } finally {
    await unlink(mark).catch(() => {})
  }
  return null
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

interface LockRead {
  /** No lock by that name when it was read. */
  absent: boolean
  /** Null when there is no lock or it cannot be read as one (then it is stale). */
  owner: Owner | null
  /** An empty or cut lock younger than YOUNG_LOCK_MS: still being written by its creator. */
  pending: boolean
}

/** The lock's owner. A whole lock ends with a newline (written at once, or linked whole). */
async function readLock (path: string): Promise<LockRead> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    return { absent: (err as NodeJS.ErrnoException).code === 'ENOENT', owner: null, pending: false }
  }
  if (!text.endsWith('\n')) {
    const since = await stat(path).then((s) => Date.now() - s.mtimeMs, () => Infinity)
    return { absent: false, owner: null, pending: since < YOUNG_LOCK_MS }
  }
  const [first, second] = text.split('\n')
  const pid = Number.parseInt((first ?? '').trim(), 10)
  const host = (second ?? '').trim()
  return { absent: false, owner: Number.isInteger(pid) && pid > 0 ? { pid, host: host === '' ? null : host } : null, pending: false }
}
