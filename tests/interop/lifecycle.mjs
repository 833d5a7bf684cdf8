// Shutdown for the interop servers: SIGTERM/SIGINT close the server and exit, and with
// INTEROP_EXIT_ON_STDIN_EOF=1 so does the end of stdin (the test runner holds it open: if the
// runner dies without stopping us, we stop too). Register before printing the ready line: the
// parent may send SIGTERM as soon as it reads it.
export function stopOnSignals(server) {
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (process.env.INTEROP_EXIT_ON_STDIN_EOF === '1') {
    process.stdin.on('end', stop);
    process.stdin.resume();
  }
}
