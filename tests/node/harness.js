'use strict';
// Shared harness for Warren's Node client tests: start a `warren dev` cluster on free ports in
// a temporary directory (its own process group, killed as one), or use WARREN_TEST_AMQP_URL.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');

const ROOT = path.resolve(__dirname, '..', '..');
const READY_TIMEOUT_MS = 120_000;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// By the AMQP URI spec a lone trailing '/' names the vhost "": read it as the default vhost.
function normalizeUrl(url) {
  const u = url.trim();
  const afterScheme = u.indexOf('://') + 3;
  const slash = u.indexOf('/', afterScheme);
  if (slash === -1) return `${u}/%2f`;
  if (slash === u.length - 1) return `${u}%2f`;
  return u;
}

function unique(prefix) {
  return `${prefix}-${crypto.randomBytes(6).toString('hex')}`;
}

class WarrenDev {
  // `compute` compute nodes over `zones` zones (`warren dev --compute N --zones Z`); `urls`
  // then holds one URL per compute node, compute-0 first.
  static async start(compute = 1, zones = 3) {
    const dev = new WarrenDev();
    dev.compute = compute;
    dev.zones = zones;
    await dev._start();
    return dev;
  }

  // SIGKILL one node of this cluster (e.g. 'compute-1') and wait until it is gone.
  async kill(name) {
    const pid = Number(fs.readFileSync(path.join(this.root, 'data', 'run', `${name}.pid`), 'utf8').trim());
    const stat = () => {
      try {
        return fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      } catch {
        return null;
      }
    };
    const fields = (stat() || '').split(')').pop().trim().split(/\s+/);
    // Only a member of this cluster's process group, never a recycled pid.
    if (Number(fields[2]) !== this.proc.pid) throw new Error(`${name} (pid ${pid}) is not part of this cluster`);
    process.kill(pid, 'SIGKILL');
    const deadline = Date.now() + 10_000;
    for (;;) {
      const now = stat();
      if (now === null || now.split(')').pop().trim().startsWith('Z')) return;
      if (Date.now() > deadline) throw new Error(`${name} did not die`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  async _start() {
    this.root = fs.mkdtempSync(path.join(os.tmpdir(), 'warren-node-'));
    const bin = process.env.WARREN_BIN || path.join(ROOT, 'target', 'debug', 'warren');
    if (!fs.existsSync(bin)) {
      throw new Error(`${bin} not found: run \`cargo build -p warren\` or set WARREN_BIN`);
    }
    this.logPath = path.join(this.root, 'warren-dev.log');
    const log = fs.openSync(this.logPath, 'a');
    const httpPort = await freePort();
    const shape = this.compute !== 1 || this.zones !== 3
      ? ['--compute', String(this.compute), '--zones', String(this.zones)]
      : [];
    // The guard stops the cluster when our end of its stdin closes, even if this process
    // dies without cleaning up.
    const guard = path.join(ROOT, 'tests', 'warren-dev-guard.sh');
    this.proc = spawn('/bin/sh', [guard, bin, 'dev', '--data-dir', path.join(this.root, 'data'),
      // AMQP on any free ports, held by warren dev until it starts the nodes; the URLs say which.
      '--amqp-port', '0', '--http-port', String(httpPort), ...shape], {
      stdio: ['pipe', 'pipe', log],
      detached: true, // its own process group
    });
    fs.closeSync(log);
    this.urls = await new Promise((resolve, reject) => {
      let buffered = '';
      const urls = [];
      const timer = setTimeout(() => fail(new Error('warren dev printed no amqp:// URL in time')),
        READY_TIMEOUT_MS);
      const fail = (err) => {
        clearTimeout(timer);
        this.stop();
        reject(new Error(`${err.message}; log tail:\n${this.logTail()}`));
      };
      this.proc.stdout.on('data', (chunk) => {
        buffered += chunk.toString();
        const lines = buffered.split('\n');
        buffered = lines.pop();
        for (const line of lines) {
          if (line.trim().startsWith('amqp://')) urls.push(normalizeUrl(line));
          if (urls.length === this.compute) {
            clearTimeout(timer);
            resolve(urls);
            return;
          }
        }
      });
      this.proc.on('exit', (code, signal) => fail(new Error(`warren dev exited (${code ?? signal})`)));
      this.proc.on('error', fail);
    });
    this.url = this.urls[0];
    this.proc.removeAllListeners('exit');
    this.proc.stdout.resume();
  }

  logTail(n = 40) {
    try {
      return fs.readFileSync(this.logPath, 'utf8').split('\n').slice(-n).join('\n');
    } catch {
      return '';
    }
  }

  stop() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      try {
        process.kill(-this.proc.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    if (this.root) fs.rmSync(this.root, { recursive: true, force: true });
  }
}

// The broker for one test file: { url, stop() }.
async function broker() {
  if (process.env.WARREN_TEST_AMQP_URL) {
    return { url: normalizeUrl(process.env.WARREN_TEST_AMQP_URL), stop() {} };
  }
  return WarrenDev.start();
}

module.exports = { broker, unique, normalizeUrl, WarrenDev };
