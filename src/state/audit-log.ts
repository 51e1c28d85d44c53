/**
 * The audit trail, `STATEDIR/audit.jsonl`: one JSON object per line for every mutating admin
 * call and every automatic action, appended and fsynced before the caller gets its answer.
 * Rotates at a size cap (default 10 MB, 5 files: audit.jsonl.1 … .5).
 */
import { open, rename, stat, readFile, mkdir, unlink } from 'node:fs/promises'
import { join } from 'node:path'

/** An audit entry before it is stamped with its time. */
export interface AuditInput {
  action: string
  targets: string[]
  reason: string
  result: string
  /** Address of the caller, or `trigger:<name>`. */
  requester: string
  [key: string]: unknown
}

export interface AuditEntry extends AuditInput {
  time: string
}

export interface AuditOptions {
  maxBytes?: number
  files?: number
}

/** The audit log's size cap: a file is rotated before it would grow past this many bytes. */
export const AUDIT_MAX_BYTES = 10 * 1024 * 1024
/** Rotated files kept beside the current one (`audit.jsonl.1` … `.5`); the oldest is deleted. */
export const AUDIT_FILES = 5

export class AuditLog {
  readonly path: string
  private readonly maxBytes: number
  private readonly files: number
  private queue: Promise<void> = Promise.resolve()
  /** The file ends with a whole line: this process's last append finished. Checked on disk until then. */
  private endsWhole = false

  constructor (readonly dir: string, options: AuditOptions = {}) {
    this.path = join(dir, 'audit.jsonl')
    this.maxBytes = options.maxBytes ?? AUDIT_MAX_BYTES
    this.files = options.files ?? AUDIT_FILES
  }

  /** Append one entry; resolves once it is on disk. */
  async append (entry: AuditEntry): Promise<void> {
    const line = JSON.stringify(entry) + '\n'
    const run = this.queue.then(async () => { await this.write(line) })
    this.queue = run.catch(() => {})
    await run
  }

  private async write (entryLine: string): Promise<void> {
    let line = entryLine
    await mkdir(this.dir, { recursive: true })
    const size = await stat(this.path).then((s) => s.size, () => 0)
    if (size > 0 && size + Buffer.byteLength(line) > this.maxBytes) {
      await this.rotate()
    } else if (size > 0 && !this.endsWhole && !(await endsWithNewline(this.path, size))) {
      // An append cut short (a process killed mid-write, a full disk) left a line without its
      // end: written after it, this entry would share its line and be unreadable too.
      line = '\n' + line
    }
    // Only this process appends (the state lock): after an append of its own that finished,
    // the file ends with a whole line and need not be read again; after one that failed, it may not.
    this.endsWhole = false
    const handle = await open(this.path, 'a', 0o600)
    try {
      await handle.write(line)
      await handle.datasync()
    } finally {
      await handle.close()
    }
    this.endsWhole = true
  }

  private async rotate (): Promise<void> {
    await unlink(`${this.path}.${this.files}`).catch(() => {})
    for (let i = this.files - 1; i >= 1; i--) await rename(`${this.path}.${i}`, `${this.path}.${i + 1}`).catch(() => {})
    await rename(this.path, `${this.path}.1`)
  }

  /** The newest `limit` entries, newest first (reads rotated files when needed). */
  async newest (limit: number): Promise<AuditEntry[]> {
    await this.queue
    const out: AuditEntry[] = []
    for (let i = 0; i <= this.files && out.length < limit; i++) {
      const file = i === 0 ? this.path : `${this.path}.${i}`
      let text: string
      try {
        text = await readFile(file, 'utf8')
      } catch {
        continue
      }
      const lines = text.split('\n').filter((l) => l !== '')
      for (let j = lines.length - 1; j >= 0 && out.length < limit; j--) {
        try {
          out.push(JSON.parse(lines[j] as string) as AuditEntry)
        } catch { /* a line cut by a crash mid-write is skipped */ }
      }
    }
    return out
  }
}

async function endsWithNewline (path: string, size: number): Promise<boolean> {
  const handle = await open(path, 'r')
  try {
    const last = Buffer.alloc(1)
    await handle.read(last, 0, 1, size - 1)
    return last[0] === 0x0a
  } finally {
    await handle.close()
  }
}
