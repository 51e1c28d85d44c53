/**
 * TLS on the data plane (SPEC §18). A TLS listener's certificate files are watched by polling
 * `stat` (which follows symlinks, so a Kubernetes Secret volume's symlink swap is seen, like a
 * file rewritten in place) and a changed pair is applied with `setSecureContext`: connections
 * already open keep the certificate they shook hands with, new ones get the new one, nothing
 * is dropped. A new pair that does not load (missing file, key not matching) is refused with
 * an error log and a counter; the running certificate stays (Envoy's SDS does the same).
 *
 * `https://` upstreams are connected to with the options of `upstreamConnect`.
 */
import { statSync, type Stats } from 'node:fs'
import { stat } from 'node:fs/promises'
import { X509Certificate } from 'node:crypto'
import type { Server as TlsServer } from 'node:tls'
import type { Logger } from 'pino'
import type { Listener, ListenerTlsConfig, UpstreamConfig } from '../config/types.js'
import { readTlsFiles, readTlsFilesSync, type TlsMaterial } from '../config/tls-files.js'

/** How often a TLS listener's certificate files are checked for a change. */
export const CERT_POLL_MS = 1000

/** What a TLS listener counts (exported as `breakwater_tls_*` metrics). */
export interface ListenerTlsStats {
  listener: Listener
  reloads: { ok: number, failed: number }
  /** Connections whose handshake failed (no or a bad client certificate, a plain-HTTP client, …). */
  handshakeFailures: number
}

/** The listener's certificate material now, or an error naming the key (start-up). */
export function listenerTlsOptions (config: ListenerTlsConfig, at: string): TlsMaterial & { requestCert: boolean, rejectUnauthorized: boolean } {
  const problems: string[] = []
  const material = readTlsFilesSync(config, at, problems)
  if (material === null) throw new Error(problems.join('; '))
  // Mutual TLS: ask for a client certificate and refuse the handshake without a valid one.
  return { ...material, requestCert: config.requestClientCert, rejectUnauthorized: config.requestClientCert }
}

function fingerprint (s: Stats | null): string {
  return s === null ? '-' : `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`
}

/** Re-reads a TLS listener's certificate files when they change and applies a good new pair. */
export class CertificateWatcher {
  private timer: NodeJS.Timeout | null = null
  private last: string
  private polling = false

  constructor (private readonly server: TlsServer, private readonly config: ListenerTlsConfig, private readonly stats: ListenerTlsStats, private readonly logger: Logger, private readonly intervalMs = CERT_POLL_MS) {
    this.last = this.paths().map((p) => { try { return fingerprint(statSync(p)) } catch { return '-' } }).join('|')
  }

  private paths (): string[] {
    const { cert, key, ca } = this.config
    return ca === null ? [cert, key] : [cert, key, ca]
  }

  start (): void {
    this.timer = setInterval(() => { void this.poll() }, this.intervalMs)
    this.timer.unref()
  }

  stop (): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }

  /** One check; exported for reload, which re-checks at once. */
  async poll (): Promise<void> {
    if (this.polling) return
    this.polling = true
    try {
      const print = (await Promise.all(this.paths().map(async (p) => fingerprint(await stat(p).catch(() => null))))).join('|')
      if (print === this.last) return
      // Remembered even when the new files are refused: a cert and a key written one after the
      // other fail once (a mismatch) and load at the next change, without an error per poll.
      this.last = print
      const at = `listen.${this.stats.listener}.tls`
      const problems: string[] = []
      const material = await readTlsFiles(this.config, at, problems)
      if (material === null) {
        this.stats.reloads.failed++
        this.logger.error({ event: 'tls_reload', listener: this.stats.listener, result: 'refused', problems }, 'new certificate files refused; the running certificate is kept')
        return
      }
      try {
        this.server.setSecureContext(material)
      } catch (err) {
        this.stats.reloads.failed++
        this.logger.error({ event: 'tls_reload', listener: this.stats.listener, result: 'refused', problems: [`${at}: ${(err as Error).message}`] }, 'new certificate files refused; the running certificate is kept')
        return
      }
      this.stats.reloads.ok++
      const cert = new X509Certificate(material.cert as Buffer)
      this.logger.info({ event: 'tls_reload', listener: this.stats.listener, result: 'ok', serialNumber: cert.serialNumber, validTo: cert.validTo }, 'certificate reloaded')
    } finally {
      this.polling = false
    }
  }
}

/** Connect options of an upstream's pools, read once per upstream definition. */
const connectOptions = new WeakMap<UpstreamConfig, Record<string, unknown>>()

/**
 * undici `connect` options for an upstream's endpoints: the connect timeout and, for an
 * `https://` upstream with `tls`, its CA, client certificate and server name. The files were
 * checked by the config build; they are read when the upstream is built (start, or a reload
 * that changes its definition).
 */
export function upstreamConnect (config: UpstreamConfig): Record<string, unknown> {
  let options = connectOptions.get(config)
  if (options !== undefined) return options
  options = { timeout: config.connectTimeoutMs }
  const tls = config.tls
  if (tls !== null) {
    const problems: string[] = []
    const material = readTlsFilesSync(tls, `upstreams.${config.name}.tls`, problems)
    // A file gone since the config build checked it fails the start-up or the reload, naming the key.
    if (material === null) throw new Error(problems.join('; '))
    Object.assign(options, material, { rejectUnauthorized: tls.rejectUnauthorized })
    if (tls.servername !== null) options.servername = tls.servername
  }
  connectOptions.set(config, options)
  return options
}
