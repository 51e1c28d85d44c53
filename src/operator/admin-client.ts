/**
 * How the CLI finds and talks to a running sidecar's admin API: the URL from `--admin`
 * (repeatable: fan out to several sidecars), else the config's `listen.admin`, else
 * 127.0.0.1:14000; the token from `BREAKWATER_ADMIN_TOKEN`, `--token-file`, the config's
 * `admin.tokenFile`, or the token the sidecar generated in its `stateDir`.
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { request } from 'undici'
import type { Config } from '../config/types.js'

export interface Target {
  admin: string
  token: string | null
}

export interface Answer {
  admin: string
  ok: boolean
  status: number
  body: any
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
  let config: Config | null = null
  if (o.configPath !== null) {
    try {
      // Loaded only when a config file names the admin address or token: the compiler of the
      // config (YAML, the schema) is most of an operator command's start-up.
      const { loadConfigFile } = await import('../config/load.js')
      config = (await loadConfigFile(o.configPath, o.env)).config
    } catch {
      notes.push(`could not read ${o.configPath}; using defaults`)
    }
  }
  let token: string | null = null
  const fromEnv = o.env.BREAKWATER_ADMIN_TOKEN
  if (fromEnv !== undefined && fromEnv.trim() !== '') token = fromEnv.trim()
  else {
    const file = o.tokenFile ?? config?.admin.tokenFile ?? (config !== null ? join(config.stateDir, 'admin.token') : null)
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
    const a = config?.listen.admin ?? { host: '127.0.0.1', port: 14000 }
    const host = a.host === '0.0.0.0' ? '127.0.0.1' : a.host.includes(':') ? `[${a.host}]` : a.host
    admins = [`http://${host}:${a.port}`]
  }
  return { targets: admins.map((admin) => ({ admin: admin.replace(/\/+$/, ''), token })), notes }
}

export async function call (target: Target, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<Answer> {
  try {
    const res = await request(`${target.admin}${path}`, {
      method,
      headers: {
        ...(target.token !== null ? { authorization: `Bearer ${target.token}` } : {}),
        ...(body !== undefined ? { 'content-type': 'application/json' } : {})
      },
      body: body === undefined ? undefined : JSON.stringify(body),
      headersTimeout: 120_000,
      bodyTimeout: 120_000
    })
    const text = await res.body.text()
    let parsed: unknown = text
    try { parsed = JSON.parse(text) } catch {}
    return { admin: target.admin, ok: res.statusCode >= 200 && res.statusCode < 300, status: res.statusCode, body: parsed }
  } catch (err) {
    const code = (err as { code?: string }).code ?? (err as Error).message
    return { admin: target.admin, ok: false, status: 0, body: null, unreachable: code }
  }
}
