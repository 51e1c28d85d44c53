/**
 * Certificates generated for a test with the `openssl` command: a CA, and certificates it
 * signs for 127.0.0.1/localhost (server) or a client, each with a serial number the test picks.
 */
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'

export interface Pki {
  dir: string
  /** The CA certificate's path. */
  ca: string
  /** Issue a certificate signed by the CA: `name.crt` and `name.key` in `dir`. */
  issue: (name: string, serial: number, usage?: 'server' | 'client' | 'both', subject?: string) => { cert: string, key: string }
  /** A server certificate signed by the CA whose validity ended in 2020. */
  issueExpired: (name: string, serial: number) => { cert: string, key: string }
}

function openssl (dir: string, args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] })
}

const EC_KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']

/** A fresh CA in a temp dir removed in teardown. */
export function createPki (t: Test, caName = 'Test CA'): Pki {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-pki-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  openssl(dir, ['req', '-x509', ...EC_KEY, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', `/CN=${caName}`])
  return {
    dir,
    ca: join(dir, 'ca.crt'),
    issue (name, serial, usage = 'server', subject = `/CN=${name}`) {
      const ext = usage === 'client'
        ? 'extendedKeyUsage=clientAuth\n'
        : `subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=${usage === 'both' ? 'serverAuth,clientAuth' : 'serverAuth'}\n`
      writeFileSync(join(dir, `${name}.ext`), ext)
      openssl(dir, ['req', ...EC_KEY, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', subject])
      openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-set_serial', String(serial), '-days', '2', '-extfile', `${name}.ext`, '-out', `${name}.crt`])
      return { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) }
    },
    issueExpired (name, serial) {
      // `openssl x509` (3.0) cannot date a certificate in the past; `openssl ca` can.
      writeFileSync(join(dir, `${name}.ext`), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n')
      writeFileSync(join(dir, `${name}.index`), '')
      writeFileSync(join(dir, `${name}.serial`), `${serial.toString(16).padStart(4, '0')}\n`)
      writeFileSync(join(dir, `${name}.cnf`), `[ca]\ndefault_ca=c\n[c]\ndatabase=${name}.index\nnew_certs_dir=.\nserial=${name}.serial\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n`)
      openssl(dir, ['req', ...EC_KEY, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`])
      openssl(dir, ['ca', '-batch', '-notext', '-config', `${name}.cnf`, '-cert', 'ca.crt', '-keyfile', 'ca.key', '-in', `${name}.csr`, '-extfile', `${name}.ext`, '-startdate', '20200101000000Z', '-enddate', '20200102000000Z', '-out', `${name}.crt`])
      return { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) }
    }
  }
}
