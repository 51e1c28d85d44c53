/**
 * Certificate files (SPEC §18): read and checked the same way by the config build (so
 * `validate` and start-up refuse a bad pair naming its key) and by the listener when it
 * re-reads rotated files at run time (so a bad new pair never replaces a good one).
 */
import { readFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { X509Certificate, createPrivateKey } from 'node:crypto'

/** File paths of a certificate, its private key and a CA bundle; each may be absent. */
export interface TlsFilePaths {
  cert: string | null
  key: string | null
  ca: string | null
}

/** The PEM contents of `TlsFilePaths`, in the shape `tls.createSecureContext` takes. */
export interface TlsMaterial {
  cert?: Buffer
  key?: Buffer
  ca?: Buffer
}

type Part = keyof TlsFilePaths

const PARTS: readonly Part[] = ['cert', 'key', 'ca']

/** One file's contents, or the problem reading it (naming `at.part`). */
function readProblem (err: unknown, at: string, part: Part, path: string): string {
  const code = (err as NodeJS.ErrnoException).code
  if (code === 'ENOENT') return `${at}.${part}: ${path} does not exist`
  if (code === 'EACCES' || code === 'EPERM') return `${at}.${part}: ${path} cannot be read (permission denied)`
  return `${at}.${part}: ${path} cannot be read (${code ?? (err as Error).message})`
}

const BEGIN = /^-----BEGIN ([A-Z0-9 ]+)-----\s*$/
const END = /^-----END ([A-Z0-9 ]+)-----\s*$/

/**
 * Whether `pem` is whole: every block ends, with its own label, and every certificate in it
 * parses. Node reads only the first certificate of a file to check it, and takes a CA bundle
 * whose last block is cut off without a word, so a file caught mid-copy (a writer that paused
 * longer than the watcher's two checks) would be applied with certificates missing.
 * Text between blocks (the comments of a system bundle) is allowed, as OpenSSL allows it.
 */
function whole (pem: string): boolean {
  let label: string | null = null
  let body: string[] = []
  for (const line of pem.split(/\r?\n/)) {
    const begin = BEGIN.exec(line)
    const end = END.exec(line)
    if (begin !== null) {
      if (label !== null) return false
      label = begin[1] as string
      body = [line]
    } else if (end !== null) {
      if (label !== end[1]) return false
      body.push(line)
      if (label === 'CERTIFICATE') {
        try {
          new X509Certificate(body.join('\n'))
        } catch {
          return false
        }
      }
      label = null
    } else if (line.startsWith('-----')) {
      return false // a marker cut off part-way
    } else if (label !== null) {
      body.push(line)
    }
  }
  return label === null
}

/** Parse and cross-check what was read; every problem names its key. */
function check (material: TlsMaterial, paths: TlsFilePaths, at: string, problems: string[]): void {
  for (const part of PARTS) {
    const pem = material[part]
    const path = paths[part]
    if (pem !== undefined && path !== null && !whole(pem.toString('latin1'))) {
      problems.push(`${at}.${part}: ${path} is cut short or damaged (a PEM block without its end, or one that does not parse): still being written?`)
      return
    }
  }
  let cert: X509Certificate | null = null
  if (material.cert !== undefined) {
    try {
      cert = new X509Certificate(material.cert)
    } catch {
      problems.push(`${at}.cert: ${paths.cert ?? ''} is not a PEM certificate`)
    }
  }
  if (material.key !== undefined) {
    try {
      const key = createPrivateKey(material.key)
      if (cert !== null && !cert.checkPrivateKey(key)) problems.push(`${at}.key: ${paths.key ?? ''} does not match the certificate ${paths.cert ?? ''}`)
    } catch {
      problems.push(`${at}.key: ${paths.key ?? ''} is not an unencrypted PEM private key`)
    }
  }
  if (material.ca !== undefined) {
    try {
      new X509Certificate(material.ca)
    } catch {
      problems.push(`${at}.ca: ${paths.ca ?? ''} is not a PEM certificate`)
    }
  }
}

/**
 * Why the certificate `pem` (the first of a chain) cannot be served at `now`: expired, or not
 * valid yet. Null when it can, or when it does not parse (`check` reports that).
 */
export function validityProblem (pem: Buffer, at: string, path: string, now = Date.now()): string | null {
  let cert: X509Certificate
  try {
    cert = new X509Certificate(pem)
  } catch {
    return null
  }
  const to = Date.parse(cert.validTo)
  const from = Date.parse(cert.validFrom)
  if (to < now) return `${at}.cert: ${path} expired on ${new Date(to).toISOString()}`
  if (from > now) return `${at}.cert: ${path} is not valid before ${new Date(from).toISOString()}`
  return null
}

/** Read and check the files now (config build); problems are pushed, null when there are any. */
export function readTlsFilesSync (paths: TlsFilePaths, at: string, problems: string[]): TlsMaterial | null {
  const material: TlsMaterial = {}
  const before = problems.length
  for (const part of PARTS) {
    const path = paths[part]
    if (path === null) continue
    try {
      material[part] = readFileSync(path)
    } catch (err) {
      problems.push(readProblem(err, at, part, path))
    }
  }
  check(material, paths, at, problems)
  return problems.length === before ? material : null
}

/** `readTlsFilesSync` off the event loop (run-time re-reads). */
export async function readTlsFiles (paths: TlsFilePaths, at: string, problems: string[]): Promise<TlsMaterial | null> {
  const material: TlsMaterial = {}
  const before = problems.length
  await Promise.all(PARTS.map(async (part) => {
    const path = paths[part]
    if (path === null) return
    try {
      material[part] = await readFile(path)
    } catch (err) {
      problems.push(readProblem(err, at, part, path))
    }
  }))
  check(material, paths, at, problems)
  return problems.length === before ? material : null
}
