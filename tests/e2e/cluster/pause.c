/* The pod sandbox ("pause") process of the local e2e cluster: holds the pod's namespaces, reaps the
 * zombies of a shared PID namespace, and exits on SIGINT/SIGTERM. Built static by local.sh (no
 * registry is reachable to pull registry.k8s.io/pause). */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { _exit(128 + sig); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction quit_action = {.sa_handler = quit};
  struct sigaction reap_action = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &quit_action, NULL) < 0 || sigaction(SIGTERM, &quit_action, NULL) < 0 ||
      sigaction(SIGCHLD, &reap_action, NULL) < 0) {
    return 1;
  }
  for (;;) {
    pause();
  }
  return 0;
}
