/**
 * How the CLI finds and talks to a running sidecar's admin API: the URL from `--admin`
 * (repeatable: fan out to several sidecars), else the config's `listen.admin`, else
 * 127.0.0.1:14000; the token from `BREAKWATER_ADMIN_TOKEN`, `--token-file`, the config's
 * `admin.tokenFile`, or the token the sidecar generated in its `stateDir`.
 */
import { readFile } from 'node:fs/promises'
import { request as httpRequest, type IncomingMessage } from 'node:http'
import { DEFAULT_ADMIN_LISTEN } from '../config/defaults.js'
import type { AdminSettings } from '../config/admin-settings.js'

export interface Target {
  admin: string
  token: string | null
}

export interface Answer {
  admin: string
  ok: boolean
  status: number
  body: any
  /** The answer's `content-type`, without parameters ('' when none). */
  contentType: string
  /** Set when a 2xx answer is not the admin API's (the CLI aimed at another port). */
  foreign?: boolean
  /** Set when the sidecar could not be reached. */
  unreachable?: string
}

export interface TargetOptions {
  admin: string[]
  tokenFile?: string
  configPath: string | null
  env: NodeJS.ProcessEnv
}

export async function resolveTargets (o: TargetOptions): Promise<{ targets: Target[], notes: string[] }> {
  const notes: string[] = []
  let config: AdminSettings | null = null
  if (o.configPath !== null) {
    try {
      // The light reader: three keys, no schema (loading the config compiler would be most of
      // an operator command's start-up).
      const { readAdminSettings } = await import('../config/admin-settings.js')
      config = await readAdminSettings(o.configPath, o.env)
    } catch {
      notes.push(`could not read ${o.configPath}; using defaults`)
    }
  }
  let token: string | null = null
  const fromEnv = o.env.BREAKWATER_ADMIN_TOKEN
  if (fromEnv !== undefined && fromEnv.trim() !== '') token = fromEnv.trim()
  else {
    const file = o.tokenFile ?? config?.tokenFile ?? config?.generatedTokenFile ?? null
    if (file !== null) {
      try {
        token = (await readFile(file, 'utf8')).trim()
      } catch {
        notes.push(`no token: set BREAKWATER_ADMIN_TOKEN or --token-file (could not read ${file})`)
      }
    } else {
      notes.push('no token: set BREAKWATER_ADMIN_TOKEN, --token-file or --config')
    }
  }
  let admins = o.admin
  if (admins.length === 0) {
    const a = config?.admin ?? DEFAULT_ADMIN_LISTEN
    const host = a.host === '0.0.0.0' ? '127.0.0.1' : a.host.includes(':') ? `[${a.host}]` : a.host
    admins = [`http://${host}:${a.port}`]
  }
  return { targets: admins.map((admin) => ({ admin: admin.replace(/\/+$/, ''), token })), notes }
}

/** Time allowed for the sidecar to answer, and between two pieces of its answer. */
const IDLE_TIMEOUT_MS = 120_000

/** One request to the admin API over `node:http` (an operator command loads no HTTP client library). */
export async function call (target: Target, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<Answer> {
  const payload = body === undefined ? undefined : JSON.stringify(body)
  try {
    const url = new URL(`${target.admin}${path}`)
    // node:https (and TLS with it) only for an https:// admin URL: the admin listener speaks plain HTTP.
    const send = url.protocol === 'https:' ? (await import('node:https')).request : httpRequest
    const { status, text, contentType } = await new Promise<{ status: number, text: string, contentType: string }>((resolve, reject) => {
      const req = send(url, {
        method,
        agent: false,
        headers: {
          ...(target.token !== null ? { authorization: `Bearer ${target.token}` } : {}),
          ...(payload !== undefined ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {})
        },
        timeout: IDLE_TIMEOUT_MS
      }, (res: IncomingMessage) => {
        const chunks: Buffer[] = []
        res.on('data', (chunk: Buffer) => chunks.push(chunk))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8'), contentType: (res.headers['content-type'] ?? '').split(';')[0]?.trim().toLowerCase() ?? '' }))
        res.on('error', reject)
        res.on('close', () => { if (!res.complete) reject(Object.assign(new Error('the answer was cut off'), { code: 'ECONNRESET' })) })
      })
      req.on('timeout', () => req.destroy(Object.assign(new Error('no answer in time'), { code: 'ETIMEDOUT' })))
      req.on('error', reject)
      req.end(payload)
    })
    let parsed: unknown = text
    try { parsed = JSON.parse(text) } catch {}
    return { admin: target.admin, ok: status >= 200 && status < 300, status, body: parsed, contentType }
  } catch (err) {
    const code = (err as { code?: string }).code ?? (err as Error).message
    return { admin: target.admin, ok: false, status: 0, body: null, contentType: '', unreachable: code }
  }
}
